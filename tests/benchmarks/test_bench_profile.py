"""`python -m mmfast bench profile`: a case built as the suites build it, its kernels listed by time."""
import os

from mmfast.benchmarks.profile import main


def test_profile_lists_the_ops_of_the_selected_cases(tmp_path):
    rc = main(["--suite", "gated_linear", "--match", "flamingo3b_out_proj fwd", "--case", "torch_gemm",
               "--case", "mmfast_reference", "--smoke", "--device", "cpu", "--calls", "1", "--out", str(tmp_path)])
    assert rc == 0
    text = open(os.path.join(tmp_path, "profile.md")).read()
    # the two workloads whose name contains the text (fwd and fwd+bwd), each with the two cases asked for
    assert text.count("### gated_linear / flamingo3b_out_proj") == 2
    assert text.count("#### torch_gemm:") == 2 and text.count("#### mmfast_reference:") == 2
    assert "#### mmfast_gemm" not in text
    assert "`aten::mm`" in text  # the GEMM the cases run shows up among the ops


def test_no_matching_workload_is_an_error(capsys):
    assert main(["--suite", "gated_linear", "--match", "no such workload", "--smoke", "--device", "cpu"]) == 1
    assert "matches" in capsys.readouterr().out

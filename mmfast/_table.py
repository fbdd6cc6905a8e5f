"""Tables for the CLI: rich when installed, aligned plain text otherwise."""


def print_table(title, columns, rows):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(str(c))
    for r in rows:
        table.add_row(*(str(v) for v in r))
    Console(width=200).print(table)


def progress(items, description):
    """Iterate with a progress bar when rich is installed (and output is a terminal)."""
    try:
        from rich.progress import track
    except ImportError:
        yield from items
        return
    yield from track(items, description=description, transient=True)

"""benchmarks package of deblend."""


def emit(result: dict, table: str, json_path: str | None) -> dict:
    """Print a benchmark's table and, when asked, write its figures as JSON."""
    import json
    from pathlib import Path

    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result

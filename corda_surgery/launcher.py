"""The console entry point, free of heavy imports: the huge-page restart (``memory.py``) re-executes the
process, so torch and transformers are imported once, after it, not twice."""

from corda_surgery.memory import restart_with_huge_pages


def run() -> None:
    """Restart with huge-page malloc where available, then the CLI."""
    restart_with_huge_pages()
    from corda_surgery.cli import main

    main()

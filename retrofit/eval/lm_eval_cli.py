"""``retrofit-lm-eval``: lm-eval's own command line with the ``retrofit`` model registered first, for
environments where the start-up hook of `make setup` is not installed."""

from __future__ import annotations


def main() -> None:
    import retrofit.eval.adapter  # noqa: F401  (registers the "retrofit" model)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

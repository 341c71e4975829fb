from .cli import main

if __name__ == "__main__":  # guarded: the audit writer process (spawn) re-imports the main module
    raise SystemExit(main())

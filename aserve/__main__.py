"""`python -m aserve ...`: start the OpenAI-compatible server (see `python -m aserve --help`)."""

from aserve.server.cli import main

if __name__ == "__main__":
    main()

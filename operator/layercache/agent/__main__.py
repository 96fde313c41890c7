"""``python -m layercache.agent``: run the node agent (see `layercache.agent.cli`)."""

from layercache.agent.cli import main

if __name__ == "__main__":
    main()

"""`python -m kiln.server ENGINE_DIR ...` is `serve-llm ENGINE_DIR ...`."""

import sys

from kiln.server.cli import main

sys.exit(main())

"""python -m server: serve a model (server/app.py)."""
if not __package__:  # run as a file, its folder and not the repository root leads sys.path
    raise SystemExit("error: run it from the repository root as: python -m server")

from server.app import main
from smolkit.common import UserError, fail

try:
    main()
except UserError as e:
    fail(str(e))

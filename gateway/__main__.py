"""``python -m gateway`` is ``trivy-gateway``."""
import sys

from .cli import main

sys.exit(main())

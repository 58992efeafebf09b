"""python -m carkin.cli"""

from carkin.cli import main

raise SystemExit(main())

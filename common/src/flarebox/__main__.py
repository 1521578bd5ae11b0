import sys

from flarebox.cli import leave_now, main

code = main()
if sys.argv[1:2] == ["predict"]:
    leave_now(code)
raise SystemExit(code)

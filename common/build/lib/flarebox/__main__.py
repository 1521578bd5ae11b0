from flarebox.cli import main

raise SystemExit(main())

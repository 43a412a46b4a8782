from convbert.cli import main

raise SystemExit(main())

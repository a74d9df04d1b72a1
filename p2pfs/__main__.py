from p2pfs.cli import main

raise SystemExit(main())

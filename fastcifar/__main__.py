from fastcifar.cli import main

raise SystemExit(main())

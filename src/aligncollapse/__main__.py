from aligncollapse.cli import main

raise SystemExit(main())

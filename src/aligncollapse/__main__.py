from aligncollapse.cli.main import main

raise SystemExit(main())

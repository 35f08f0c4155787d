from gpunet.cli import main

raise SystemExit(main())

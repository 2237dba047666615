from deepfm.cli import main

raise SystemExit(main())

from llmkern.cli import main

raise SystemExit(main())

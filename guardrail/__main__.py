from __future__ import annotations

from guardrail.cli import main

raise SystemExit(main())

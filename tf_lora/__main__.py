"""``python -m tf_lora``: the ``tf-lora`` command line (see `tf_lora.cli`)."""

from tf_lora.cli import main

raise SystemExit(main())

"""python -m mobilellm_train.data.prepare: the same as the mobilellm-prepare command (cli.main)."""

from mobilellm_train.data.prepare.cli import main

main()

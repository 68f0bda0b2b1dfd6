#!/bin/bash
# The image's default command. It must print nothing itself: the platform reads stdout as the log,
# and a banner before the executor once broke template parsing (ymir PR 1709).
exec /opt/venv/bin/python -m mirseg.ymir "$@"

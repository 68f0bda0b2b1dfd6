"""The YMIR executor: the only code that knows ``/in`` and ``/out`` (``shared/docs/ymir-protocol.md``).

``mirseg ymir`` (or ``python -m mirseg.ymir``) is the image's command: it reads ``/in/env.yaml``
and runs training, or mining and/or inference, with mirseg's own functions.
"""

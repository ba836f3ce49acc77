"""Serving: the batching engine (``engine``) and the HTTP app with its playground (``app``, needs the ``serve``
extra: ``pip install 'difflm[serve]'``)."""

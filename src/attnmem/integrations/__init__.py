"""Integrations with other libraries, each an optional extra imported only on request.

``import attnmem.integrations.hf`` needs ``pip install 'attnmem[hf]'``; nothing else in
attnmem imports these modules.
"""

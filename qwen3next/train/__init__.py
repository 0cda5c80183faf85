"""Training: data packing (data.py), the loop (loop.py), resumable checkpoints (state.py), and the
`train` / `demo` commands (cli.py)."""

from .data import ByteTokenizer, DataError, PackedCorpus, Position, list_files, load_tokenizer
from .loop import Corpus, Trainer, TrainingError, TrainSettings
from .state import find_checkpoint, verify_checkpoint

__all__ = ["ByteTokenizer", "Corpus", "DataError", "PackedCorpus", "Position", "Trainer", "TrainingError",
           "TrainSettings", "find_checkpoint", "list_files", "load_tokenizer", "verify_checkpoint"]

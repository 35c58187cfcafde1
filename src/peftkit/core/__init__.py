"""The engine. Nothing in here names a specific method.

- `protocol.py` — what a method supplies: `Delta` (a change at a site), `ModelDelta` (a change at the
  model's inputs), `Controller` (training-time logic).
- `forms/` — the attachment forms' machinery: `select` (existing parameters made trainable), `input`
  (virtual tokens), `context` (key/value prefixes), `mask` (a fixed sparsity mask over any delta),
  `table` (a learned table, maybe reparameterised); the site forms (reparam, sequential, parallel,
  scale) are hooks that `host.py` composes.
- `targets.py`, `arch.py` — target specs to sites; roles (attention, FFN, norms) found from structure.
- `linear.py` — one (out, in) view of Linear, Conv1D and quantized layers.
- `host.py`, `tuned.py` — the site wrapper and the model users hold.
- `config.py`, `registry.py` — frozen method configs; name → method.
- `files/`, `loading.py`, `fingerprint.py`, `atomic.py` — adapter files in both formats, strictly read,
  atomically written.
"""

"""The embedding stage: candidate scans in, stored vectors out, whatever source they came from (a folder, a
manifest, a PACS: :mod:`hctembed.io.sources`).

``loading.py`` turns each candidate into the model input in DataLoader workers (never raising for one bad scan);
``run.py`` embeds them into a database in batches, recording every outcome, and refreshes the index; ``shards.py``
and ``parts.py`` do the same per rank of a ``torchrun`` job into Parquet parts and merge them.
"""

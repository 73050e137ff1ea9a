"""The expert store: one expert's bytes read from the file (O_DIRECT or buffered, page cache
dropped) on background threads into staging buffers, and streams of reads for the lossless path.

May import: base, fileformat.
"""

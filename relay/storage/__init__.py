"""Everything the relay keeps on disk: user Maildirs, queues, the archive."""

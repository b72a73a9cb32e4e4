"""Weight manifest and fetching. The weight files themselves are never committed."""

"""qflare.tui"""

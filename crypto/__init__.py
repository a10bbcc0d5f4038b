"""qflare.crypto"""

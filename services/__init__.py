"""qflare.services"""

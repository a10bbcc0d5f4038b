"""qflare.messages"""

"""toolkit/core/protocol"""

"""toolkit/core/data"""

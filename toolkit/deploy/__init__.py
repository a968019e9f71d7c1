"""toolkit/deploy"""

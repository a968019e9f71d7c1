"""Wire format, activation codecs, messages, topics and modes: what travels between roles."""

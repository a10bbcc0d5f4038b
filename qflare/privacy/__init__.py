"""Pure differential-privacy core: mechanism and accounting decisions."""

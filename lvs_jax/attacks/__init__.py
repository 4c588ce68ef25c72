"""Token-level attacks, compiled: GCG and AutoDAN as nanoGCG / HarmBench run them.

  common      prompt layout around the attack string, in-context retokenization filter, banned tokens,
              target loss (CE / mellowmax), refusal check
  gcg         GCG (Zou et al. 2023): one-hot token gradient, candidate sampling, cached-prefix chunked losses
  autodan     AutoDAN (Liu et al. 2023): genetic algorithm over templates, HarmBench settings
  test_cases  saved attacks as fixed-source test cases (HarmBench layout, JailbreakBench artifacts)
  classifier  the classifier judge (HarmBench protocol, any local causal LM)
  audit       the experiment: attacks over a prompt set, saved, judged, reported
"""

bench:
	./dev bench

test:
	./dev test

demo:
	./dev demo

.PHONY: bench test demo

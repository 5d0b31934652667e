"""functional correctness on small tasks: stock llama.cpp against neuralink.Llama, greedy, same prompts

    python code_tasks.py ORIGINAL.gguf CONVERTED.neuralink.gguf [NAME=KWARGS_JSON ...]
    SET=facts python code_tasks.py ORIGINAL.gguf CONVERTED.neuralink.gguf [NAME=KWARGS_JSON ...]

Code (the default set): each task is a function signature and docstring; the model completes the body
(greedy, at most 160 tokens, cut at the next top-level statement), and the completed function runs against
the task's asserts. Facts (SET=facts): 30 English sentences to complete with one well-known answer (a
capital, a chemical symbol, a sum), passed when the first 16 greedy tokens hold it. Prints one line per
model setting: tasks passed, and the tasks where it differs from stock. Settings: "stock", "default"
(neuralink.Llama with its defaults), "dense" (every neuron), and any NAME={"memory_budget": "530MB"} given;
each in a process of its own.
Not a benchmark of the field: tasks written for this check, to see whether sparsity breaks what stock gets
right.
"""
import json
import multiprocessing
import os
import re
import signal
import sys

import llama_cpp
import neuralink

TASKS = [
    ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
     "assert add(2, 3) == 5 and add(-1, 1) == 0"),
    ("def is_palindrome(s):\n    \"\"\"Return True if the string s reads the same backwards, ignoring case.\"\"\"\n",
     "assert is_palindrome('Level') and not is_palindrome('python') and is_palindrome('')"),
    ("def factorial(n):\n    \"\"\"Return n! for a non-negative integer n.\"\"\"\n",
     "assert factorial(0) == 1 and factorial(5) == 120"),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.\"\"\"\n",
     "assert [fibonacci(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]"),
    ("def reverse_words(s):\n    \"\"\"Return the words of s in reverse order, joined by single spaces.\"\"\"\n",
     "assert reverse_words('the quick brown fox') == 'fox brown quick the'"),
    ("def count_vowels(s):\n    \"\"\"Return how many characters of s are vowels (a, e, i, o, u, either case).\"\"\"\n",
     "assert count_vowels('Hello World') == 3 and count_vowels('xyz') == 0"),
    ("def largest(xs):\n    \"\"\"Return the largest element of the non-empty list xs without calling max().\"\"\"\n",
     "assert largest([3, 9, 2]) == 9 and largest([-5, -2, -7]) == -2"),
    ("def flatten(lists):\n    \"\"\"Return one list holding the elements of each list in lists, in order.\"\"\"\n",
     "assert flatten([[1, 2], [], [3]]) == [1, 2, 3]"),
    ("def is_prime(n):\n    \"\"\"Return True if the integer n is a prime number.\"\"\"\n",
     "assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]"),
    ("def gcd(a, b):\n    \"\"\"Return the greatest common divisor of the positive integers a and b.\"\"\"\n",
     "assert gcd(12, 18) == 6 and gcd(7, 5) == 1"),
    ("def celsius_to_fahrenheit(c):\n    \"\"\"Convert a temperature from degrees Celsius to degrees Fahrenheit.\"\"\"\n",
     "assert celsius_to_fahrenheit(100) == 212 and celsius_to_fahrenheit(0) == 32"),
    ("def unique_sorted(xs):\n    \"\"\"Return the distinct elements of xs in ascending order.\"\"\"\n",
     "assert unique_sorted([3, 1, 3, 2, 1]) == [1, 2, 3]"),
    ("def word_count(s):\n    \"\"\"Return a dict mapping each whitespace-separated word of s to how often it occurs.\"\"\"\n",
     "assert word_count('a b a c a') == {'a': 3, 'b': 1, 'c': 1}"),
    ("def second_largest(xs):\n    \"\"\"Return the second largest distinct value in xs (at least two distinct values).\"\"\"\n",
     "assert second_largest([4, 1, 4, 3]) == 3 and second_largest([1, 2]) == 1"),
    ("def capitalize_words(s):\n    \"\"\"Return s with the first letter of every space-separated word in upper case.\"\"\"\n",
     "assert capitalize_words('hello big world') == 'Hello Big World'"),
    ("def sum_of_digits(n):\n    \"\"\"Return the sum of the decimal digits of the non-negative integer n.\"\"\"\n",
     "assert sum_of_digits(0) == 0 and sum_of_digits(4096) == 19"),
    ("def merge_sorted(a, b):\n    \"\"\"Merge the two ascending lists a and b into one ascending list.\"\"\"\n",
     "assert merge_sorted([1, 4, 6], [2, 3, 7]) == [1, 2, 3, 4, 6, 7] and merge_sorted([], [1]) == [1]"),
    ("def running_sum(xs):\n    \"\"\"Return the list of prefix sums of xs: element i is xs[0] + ... + xs[i].\"\"\"\n",
     "assert running_sum([1, 2, 3, 4]) == [1, 3, 6, 10] and running_sum([]) == []"),
    ("def is_anagram(a, b):\n    \"\"\"Return True if the strings a and b hold the same letters the same number of times.\"\"\"\n",
     "assert is_anagram('listen', 'silent') and not is_anagram('abc', 'abd')"),
    ("def chunk(xs, n):\n    \"\"\"Split the list xs into consecutive lists of n elements; the last may be shorter.\"\"\"\n",
     "assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]"),
]
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert"]

# (sentence to complete, answers any one of which passes, lower case)
FACTS = [
    ("The capital of France is", ("paris",)),
    ("The capital of Japan is", ("tokyo",)),
    ("The capital of Italy is", ("rome",)),
    ("The capital of Germany is", ("berlin",)),
    ("The capital of Spain is", ("madrid",)),
    ("The largest planet in the Solar System is", ("jupiter",)),
    ("At sea level, water boils at a temperature in degrees Celsius of", ("100",)),
    ("The chemical symbol for gold is", ("au",)),
    ("The chemical symbol for sodium is", ("na",)),
    ("The play Romeo and Juliet was written by William", ("shakespeare",)),
    ("In Python, a function is defined with the keyword", ("def",)),
    ("The number of days in a leap year is", ("366",)),
    ("The square root of 144 is", ("12",)),
    ("In degrees Fahrenheit, water freezes at", ("32",)),
    ("The first person to walk on the Moon was Neil", ("armstrong",)),
    ("The longest river in Africa is the", ("nile",)),
    ("The smallest prime number is", ("2",)),
    ("The HTTP status code 404 means", ("not found",)),
    ("In Python, the built-in function that returns the length of a list is", ("len",)),
    ("The currency of the United Kingdom is the", ("pound",)),
    ("The planet known as the Red Planet is", ("mars",)),
    ("The hardest natural substance on Earth is", ("diamond",)),
    ("For photosynthesis, plants take from the air the gas called", ("carbon dioxide", "co2", "co₂")),
    ("The telephone was invented by Alexander Graham", ("bell",)),
    ("The ocean between Europe and North America is the", ("atlantic",)),
    ("Seven times eight equals", ("56",)),
    ("The programming language whose package index is called PyPI is", ("python",)),
    ("The opposite of hot is", ("cold",)),
    ("Mount Everest is in the mountain range called the", ("himalaya",)),
    ("The freezing point of water in degrees Celsius is", ("0", "zero")),
]


def passes(source: str, test: str) -> bool:
    def timeout(*_):
        raise TimeoutError
    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    try:
        namespace: dict = {}
        exec(source + "\n" + test, namespace)
        return True
    except BaseException:
        return False
    finally:
        signal.alarm(0)


def answer_pattern(answer: str) -> str:
    """An answer as the start of a word ("himalaya" passes "Himalayas"); a number as a whole one ("0" does not
    pass "100")."""
    end = r"(?![0-9])" if answer[-1].isdigit() else ""
    return r"(?<![0-9a-z])" + re.escape(answer) + end


def run(llm, task_set: str) -> list[bool]:
    results = []
    for prompt, check in FACTS if task_set == "facts" else TASKS:
        llm.reset()  # no prefix of the previous task reused: each task decodes the same way whatever ran before
        if task_set == "facts":
            out = llm(prompt, max_tokens=16, temperature=0.0)["choices"][0]["text"].lower()
            results.append(any(re.search(answer_pattern(a), out) for a in check))
        else:
            out = llm(prompt, max_tokens=160, temperature=0.0, stop=STOP)["choices"][0]["text"]
            results.append(passes(prompt + out, check))
    return results


def passed_by(model: str, kwargs: dict | None, task_set: str) -> list[bool]:
    """The tasks each passes, in a process of its own (a memory budget counts the whole process)."""
    common = dict(n_ctx=512, n_threads=2, verbose=False)
    llm = llama_cpp.Llama(model, **common) if kwargs is None else neuralink.Llama(model, **common, **kwargs)
    try:
        return run(llm, task_set)
    finally:
        llm.close()


def main() -> None:
    original, converted = sys.argv[1], sys.argv[2]
    task_set = os.environ.get("SET", "code")
    if task_set not in ("code", "facts"):
        sys.exit(f"SET={task_set}: expected code or facts")
    tasks = FACTS if task_set == "facts" else TASKS
    names = [t[0] if task_set == "facts" else t[0].split("(")[0][4:] for t in tasks]
    # the engine's default setting (ffn='auto' would leave an uncapped model's FFNs to llama.cpp: "auto" below)
    settings = {"default": {"ffn": "engine"}, "dense": {"predictor": "dense"}, "auto": {}}
    settings.update((a.split("=", 1)[0], json.loads(a.split("=", 1)[1])) for a in sys.argv[3:])
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        reference = pool.apply(passed_by, (original, None, task_set))
        print(f"stock     {sum(reference):2d}/{len(tasks)}", flush=True)
        for name, kwargs in settings.items():
            got = pool.apply(passed_by, (converted, kwargs, task_set))
            differ = [names[i] for i, (a, b) in enumerate(zip(reference, got)) if a != b]
            print(f"{name:9s} {sum(got):2d}/{len(tasks)}  differs from stock on: {'; '.join(differ) or 'none'}",
                  flush=True)


if __name__ == "__main__":
    main()

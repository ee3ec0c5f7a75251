"""Test data: ShareGPT (Vicuna-style) conversation files, written deterministically.

`write_sharegpt(path, n, seed)` writes `n` conversations, each on its own topic, with 1 to 4 assistant
turns (every count present once n >= 4) and a system turn in about one in eight, as Vicuna's data has them:
{"id": "<7 letters>_0", "conversations": [{"from": "system"?}, {"from": "human"}, {"from": "gpt"}, ...]}.
Each topic's turns are written by hand, so no two conversations share their wording and a dedup stage keeps
them all. A `.json` path gets one JSON list, anything else JSON lines.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

# (opening request, its answer, three follow-ups with their answers), one topic each.
TOPICS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("How do I keep basil alive on a kitchen windowsill?",
     "Give it at least six hours of sun, water when the top centimetre of soil is dry, and pinch off flower "
     "buds so the plant keeps making leaves.",
     [("The lower leaves are turning yellow. Why?",
       "Yellow lower leaves usually mean too much water. Let the pot drain fully and water less often."),
      ("Can I grow it from a cutting instead of seeds?",
       "Yes. Put a ten-centimetre stem in a glass of water; roots appear within two weeks, then pot it."),
      ("When is the best time to harvest?",
       "Harvest in the morning, cutting just above a pair of leaves so two new shoots grow from that point.")]),
    ("Explain what a mortgage amortization schedule is.",
     "It is a table of every payment over the life of the loan, showing how much of each payment goes to "
     "interest and how much reduces the principal.",
     [("Why is so much of the early payment interest?",
       "Interest is charged on the remaining balance, which is largest at the start, so early payments are "
       "mostly interest."),
      ("Does paying extra each month help?",
       "Extra payments go straight to principal, which shortens the loan and cuts the total interest paid."),
      ("Is a fifteen-year term always better than thirty?",
       "It costs less interest overall, but the monthly payment is higher; it is better only if that payment "
       "fits your budget comfortably.")]),
    ("Write a haiku about an autumn train station.",
     "Cold rails hum softly\nmaple leaves ride the last car\nplatform lights blink on",
     [("Now make it about spring instead.",
       "Warm rails tick in sun\ncherry petals on the bench\na whistle, then birds"),
      ("Can you explain the syllable count you used?",
       "Each haiku follows five, seven and five syllables across its three lines."),
      ("Give it a title.", "\"Between Departures\"")]),
    ("What causes the seasons on Earth?",
     "The tilt of Earth's axis, about 23.5 degrees, changes how directly sunlight hits each hemisphere over "
     "the year.",
     [("So it is not about distance from the Sun?",
       "No. Earth is actually closest to the Sun in early January, during the northern winter."),
      ("Why are the tropics warm all year?",
       "Near the equator the Sun stays high in the sky in every month, so the heating barely changes."),
      ("Do other planets have seasons?",
       "Yes. Mars has a similar tilt and clear seasons, while Uranus, tipped on its side, has extreme ones.")]),
    ("Help me plan a three-day trip to Lisbon.",
     "Day one: Alfama and the castle. Day two: Belém's monastery and tower. Day three: a day trip to Sintra's "
     "palaces.",
     [("What should I eat there?",
       "Try pastéis de nata, grilled sardines, bacalhau dishes and a bifana sandwich from a local snack bar."),
      ("Is public transport easy to use?",
       "Yes. A rechargeable Viva Viagem card covers the metro, trams, buses and the train to Sintra."),
      ("Any tips for the hills?",
       "Wear shoes with good grip; the limestone pavements get slippery, and the funiculars save steep climbs.")]),
    ("Why does bread go stale?",
     "Staling is mostly starch retrogradation: the starch molecules recrystallize and push water out, which "
     "makes the crumb firm and dry.",
     [("Does the fridge help?",
       "No, refrigeration speeds up retrogradation. Keep bread at room temperature or freeze it."),
      ("How can I revive a stale loaf?",
       "Sprinkle it with water and warm it in a hot oven for a few minutes; the heat melts the crystals again."),
      ("Why does sourdough last longer?",
       "Its acidity slows mould and changes the starch structure, so it stays fresh for several days.")]),
    ("What is the difference between a virus and a bacterium?",
     "Bacteria are living single cells that reproduce on their own; viruses are much smaller particles that "
     "can only multiply inside a host cell.",
     [("Is that why antibiotics do not work on colds?",
       "Exactly. Antibiotics target bacterial structures that viruses simply do not have."),
      ("Are all bacteria harmful?",
       "Far from it. Most are harmless, and many in your gut help digest food and train the immune system."),
      ("How do vaccines fit in?",
       "A vaccine shows the immune system a harmless piece or version of a pathogen so it can respond faster "
       "to the real thing.")]),
    ("Translate 'Where is the nearest pharmacy?' into Spanish.",
     "¿Dónde está la farmacia más cercana?",
     [("And into Italian?", "Dov'è la farmacia più vicina?"),
      ("How would I ask if it is open on Sunday, in Spanish?", "¿Está abierta el domingo?"),
      ("What is the polite way to thank the pharmacist?", "\"Muchas gracias, muy amable.\"")]),
    ("How do I reverse a linked list in Python?",
     "Walk the list keeping three pointers: previous, current and next. Point each node back at the previous "
     "one, then return the old tail as the new head.",
     [("Can you show the code?",
       "def reverse(head):\n    prev = None\n    while head:\n        head.next, prev, head = prev, head, head.next\n"
       "    return prev"),
      ("What is its time complexity?", "Linear time, O(n), and constant extra memory, O(1)."),
      ("Could I do it recursively?",
       "Yes, but each node adds a stack frame, so a very long list can hit Python's recursion limit.")]),
    ("Summarize the causes of the French Revolution in a few sentences.",
     "France was nearly bankrupt after costly wars, bread prices soared after poor harvests, and the "
     "privileged clergy and nobility paid little tax. Enlightenment ideas made people question absolute "
     "monarchy.",
     [("What happened at the Estates-General?",
       "The Third Estate, outvoted by the other two, declared itself the National Assembly in June 1789."),
      ("Why was the Bastille stormed?",
       "Parisians feared royal troops would crush the Assembly, and the fortress held gunpowder they wanted."),
      ("How did it end?",
       "Most historians end it with Napoleon's coup in 1799, which brought the Consulate to power.")]),
    ("My cat keeps scratching the sofa. What can I do?",
     "Offer a sturdy scratching post next to the sofa, reward the cat when it uses it, and cover the sofa "
     "corners with double-sided tape for a while.",
     [("She ignores the post completely.",
       "Try a taller post that does not wobble, or a horizontal cardboard scratcher; rub catnip on it."),
      ("Should I trim her claws?",
       "Yes, every few weeks, cutting only the clear tip and avoiding the pink quick."),
      ("Is declawing an option?",
       "Vets widely advise against it: it amputates part of each toe and can cause lasting pain.")]),
    ("What is the Pythagorean theorem?",
     "In a right triangle, the square of the hypotenuse equals the sum of the squares of the other two sides: "
     "a² + b² = c².",
     [("If the legs are 6 and 8, how long is the hypotenuse?", "It is 10, because 36 + 64 = 100."),
      ("Does it work for triangles without a right angle?",
       "Not as stated; the law of cosines generalizes it by adding a term for the angle."),
      ("Who proved it first?",
       "It carries Pythagoras' name, but Babylonian tablets show the relationship was known a millennium "
       "earlier.")]),
    ("Give me a simple recipe for lentil soup.",
     "Soften an onion, carrot and celery in olive oil, add garlic and cumin, then a cup of red lentils and a "
     "litre of stock. Simmer for twenty-five minutes and finish with lemon juice.",
     [("Can I use green lentils?", "Yes, but they hold their shape and need about forty minutes."),
      ("How long does it keep?", "Four days in the fridge, or three months frozen."),
      ("How do I make it creamier without cream?",
       "Blend half of the soup and stir it back in, or add a spoon of tahini.")]),
    ("How does a bill become a law in the United States?",
     "A bill passes both the House and the Senate in identical form and is then signed by the President, or "
     "Congress overrides a veto with two-thirds majorities.",
     [("What happens in committee?",
       "Committees hold hearings, amend the text, and decide whether the bill reaches the floor at all."),
      ("What is a filibuster?",
       "A Senate tactic of extended debate to block a vote; ending it takes sixty votes."),
      ("What is a pocket veto?",
       "If Congress adjourns within ten days of sending a bill and the President does not sign it, it dies.")]),
    ("What should I look for when buying a used bicycle?",
     "Check the frame for cracks, spin the wheels for wobble, test both brakes, and shift through every gear.",
     [("How do I know the right size?",
       "Standing over the top tube you want a few centimetres of clearance, and a slight knee bend at the "
       "bottom of the pedal stroke."),
      ("Is a rusty chain a deal breaker?",
       "Not usually; a chain is cheap to replace, but a worn cassette may need replacing with it."),
      ("What is a fair price?",
       "Look up the model's original price; three to five years old is often half of it or less.")]),
    ("Can you explain what inflation is to a ten-year-old?",
     "Inflation is when prices slowly go up, so the same pocket money buys a little less candy than before.",
     [("Why do prices go up?",
       "Sometimes lots of people want to buy things at once, and sometimes making things gets more expensive."),
      ("Is inflation always bad?",
       "A little is normal and healthy; very fast inflation is the problem."),
      ("What can a bank do about it?",
       "The central bank can raise interest rates so borrowing costs more and spending slows down.")]),
    ("Draft a polite email asking my landlord to fix a leaking tap.",
     "Dear Ms Patel,\n\nThe kitchen tap in flat 4 has been leaking steadily since Monday. Could you arrange a "
     "repair this week? I am home after 5 pm on weekdays.\n\nThank you,\nSam",
     [("Make it a bit firmer; this is the second time I am asking.",
       "Dear Ms Patel,\n\nI wrote last week about the leaking kitchen tap in flat 4 and it has not been "
       "repaired. Please arrange a plumber by Friday, as the leak is wasting water.\n\nRegards,\nSam"),
      ("Add a line about the water bill.",
       "Since the water bill is in my name, I would also ask that the extra usage be taken into account."),
      ("What subject line should I use?", "\"Second request: leaking kitchen tap, flat 4\"")]),
    ("How do noise-cancelling headphones work?",
     "Microphones pick up the surrounding sound and the headphones play an inverted copy of it, so the two "
     "waves cancel out.",
     [("Why do they block low hums better than voices?",
       "Steady low-frequency sounds are easy to predict; speech changes too fast to cancel fully."),
      ("Can they harm my hearing?", "No, they let you listen at lower volume, which protects it."),
      ("Why do some people feel pressure wearing them?",
       "The missing low-frequency noise can feel like the ear pressure of a plane descent; it is harmless.")]),
    ("What are the rules of chess castling?",
     "The king moves two squares toward a rook and the rook jumps to the square the king crossed. Neither "
     "piece may have moved before.",
     [("Can I castle out of check?", "No, and the king may not pass through or land on an attacked square."),
      ("Can the rook be under attack?", "Yes, only the king's squares matter."),
      ("How do I write castling in notation?", "O-O for the kingside and O-O-O for the queenside.")]),
    ("I have a job interview tomorrow for a data analyst role. How should I prepare?",
     "Review the company's products, prepare two stories about analyses you did and their impact, and "
     "practise a SQL question with joins and grouping.",
     [("What if they ask about a weakness?",
       "Name a real but fixable one and what you are doing about it, such as learning to present results "
       "more briefly."),
      ("What questions should I ask them?",
       "Ask what decisions the team's analyses feed, and what the first ninety days would look like."),
      ("Should I bring a portfolio?",
       "A short notebook or dashboard you can walk through in five minutes makes a strong impression.")]),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light reaches "
     "our eyes from every direction of the sky.",
     [("Then why are sunsets red?",
       "At sunset light crosses much more air, so most blue is scattered away before it reaches you."),
      ("Why isn't the sky violet?",
       "Sunlight has less violet, some is absorbed high up, and our eyes are less sensitive to it."),
      ("What colour is the sky on Mars?",
       "Dusty butterscotch by day, while Martian sunsets look bluish.")]),
    ("How can I improve my sleep?",
     "Keep the same wake-up time every day, avoid caffeine after noon, keep the bedroom cool and dark, and put "
     "screens away an hour before bed.",
     [("Is napping bad?", "Short naps under thirty minutes before mid-afternoon are fine for most people."),
      ("Does alcohol help me fall asleep?",
       "It may speed up falling asleep but fragments sleep later in the night."),
      ("When should I see a doctor?",
       "If poor sleep lasts more than a month, or you snore loudly and wake unrefreshed.")]),
    ("Explain the difference between 'affect' and 'effect'.",
     "'Affect' is usually a verb meaning to influence; 'effect' is usually a noun meaning a result.",
     [("Give me an example sentence with both.", "The new schedule affected our sleep, and the effect was obvious."),
      ("Are there exceptions?",
       "Yes: 'to effect change' uses effect as a verb meaning to bring about, and psychologists speak of a "
       "person's affect."),
      ("Any trick to remember it?", "Think RAVEN: Remember, Affect is a Verb, Effect is a Noun.")]),
    ("What is compound interest?",
     "Interest earned on both the original amount and the interest already added, so savings grow faster "
     "over time.",
     [("How much would 1,000 dollars at 5 percent become in ten years?",
       "About 1,629 dollars with yearly compounding."),
      ("What is the rule of 72?",
       "Divide 72 by the interest rate to estimate the years to double: at 6 percent, about 12 years."),
      ("Does compounding work against me on debt?",
       "Yes; credit card balances compound the same way, which is why they grow quickly.")]),
    ("Suggest a beginner workout I can do at home without equipment.",
     "Three rounds of ten squats, eight push-ups (on the knees if needed), a thirty-second plank and twelve "
     "lunges, resting a minute between rounds.",
     [("How often should I do it?", "Three times a week, with a rest day between sessions."),
      ("The push-ups are too hard.", "Start with wall or countertop push-ups and lower the surface over time."),
      ("How do I make it harder later?", "Add a round, slow down each repetition, or try jump squats.")]),
    ("What is photosynthesis?",
     "It is how plants use sunlight, water and carbon dioxide to make glucose, releasing oxygen as a by-product.",
     [("Where in the plant does it happen?", "In the chloroplasts, mostly in the leaves' mesophyll cells."),
      ("Why are leaves green?", "Chlorophyll absorbs red and blue light and reflects green."),
      ("Do plants do it at night?",
       "The light reactions stop at night, but plants keep respiring and some, like cacti, store CO2 in the "
       "dark.")]),
    ("How do I write a good cover letter?",
     "Open with the role and why you want it, give two concrete achievements that match the job, and close by "
     "asking for an interview. Keep it under a page.",
     [("Should I repeat my CV?", "No; pick the parts most relevant to this job and tell the story behind them."),
      ("How do I address it if I don't know the name?", "\"Dear Hiring Team\" is safe and modern."),
      ("Is it fine to mention a career gap?", "Yes, briefly and positively, stating what you did in that time.")]),
    ("Can you recommend some classic science fiction novels?",
     "Try Frank Herbert's Dune, Ursula K. Le Guin's The Left Hand of Darkness, and Isaac Asimov's Foundation.",
     [("Something shorter?", "Ray Bradbury's Fahrenheit 451 or Ted Chiang's novella Story of Your Life."),
      ("Any with a female lead?", "Octavia E. Butler's Parable of the Sower."),
      ("Which one became a film?", "Story of Your Life became Denis Villeneuve's Arrival in 2016.")]),
    ("What is the difference between weather and climate?",
     "Weather is the state of the atmosphere over hours or days; climate is the average pattern over decades.",
     [("So a cold winter does not disprove global warming?",
       "Right; one season is weather, while warming shows in long-term averages."),
      ("How long is 'long-term'?", "Climatologists usually use thirty-year averages."),
      ("What drives climate change now?",
       "Mainly greenhouse gases from burning coal, oil and gas, which trap more heat.")]),
    ("My sourdough starter smells like nail polish remover. Is it ruined?",
     "No, that acetone smell means it is hungry. Discard most of it and feed it flour and water more often.",
     [("How often should I feed it?", "At room temperature, once or twice a day."),
      ("What ratio should I use?", "Equal weights of starter, flour and water is a good default."),
      ("Can I keep it in the fridge?", "Yes, then feeding it once a week is enough.")]),
    ("What does a product manager do?",
     "They decide what a team builds and why: they talk to users, set priorities, and make sure engineering, "
     "design and business agree on the plan.",
     [("Do they need to code?", "Not usually, but technical understanding helps them weigh trade-offs."),
      ("How is that different from a project manager?",
       "A project manager tracks schedules and delivery; a product manager decides what is worth delivering."),
      ("How do people get into it?", "Often from engineering, design, support or analytics roles.")]),
    ("Convert 72 degrees Fahrenheit to Celsius.",
     "72 °F is about 22.2 °C: subtract 32, then multiply by 5/9.",
     [("And 30 °C to Fahrenheit?", "86 °F: multiply by 9/5, then add 32."),
      ("Is there a quick mental trick?", "Double the Celsius figure and add 30; it is close for everyday values."),
      ("At what temperature are they equal?", "At minus 40 degrees.")]),
    ("Why do we have leap years?",
     "A solar year is about 365.24 days, so an extra day every four years keeps the calendar in step with the "
     "seasons.",
     [("Was 1900 a leap year?",
       "No. Century years are leap years only when divisible by 400, so 1900 was not but 2000 was."),
      ("Who introduced that rule?", "Pope Gregory XIII's calendar reform of 1582."),
      ("What happens to people born on 29 February?",
       "They usually celebrate on 28 February or 1 March in common years.")]),
    ("How do I make my small apartment feel bigger?",
     "Use light colours, a large mirror opposite the window, furniture raised on legs, and storage that goes up "
     "the walls.",
     [("What about lighting?", "Layer several lamps at different heights instead of one ceiling light."),
      ("Rugs: big or small?", "One large rug makes a room read as one open space."),
      ("Should I paint the ceiling?", "A ceiling slightly lighter than the walls makes it seem higher.")]),
    ("What is machine learning in simple terms?",
     "Instead of writing rules by hand, you show a computer many examples and it finds the patterns itself, so "
     "it can make predictions on new data.",
     [("What is overfitting?",
       "When a model memorises its training examples, noise included, and then does poorly on new data."),
      ("How do you detect it?",
       "Hold out data the model never saw and compare its score there with the training score."),
      ("Where is it used day to day?", "Spam filters, photo search, recommendations and speech recognition.")]),
    ("Tell me about the Great Barrier Reef.",
     "It is the world's largest coral reef system, stretching over 2,300 kilometres off Queensland, Australia, "
     "and home to thousands of species.",
     [("What is coral bleaching?",
       "Heat-stressed corals expel the algae living in them, turn white, and may starve."),
      ("Can bleached coral recover?", "Yes, if the water cools in time; repeated events make it harder."),
      ("How can visitors help?",
       "Choose certified operators, use reef-safe sunscreen and never touch or stand on coral.")]),
    ("How should I store fresh herbs?",
     "Treat soft herbs like parsley and coriander like flowers: stems in a jar of water in the fridge. Wrap "
     "woody herbs like thyme in a damp paper towel.",
     [("And basil?", "Basil hates the cold; keep its jar on the counter."),
      ("Can I freeze herbs?", "Chop them into ice cube trays with olive oil for cooking later."),
      ("How long do dried herbs last?", "About a year before their flavour fades noticeably.")]),
    ("Explain how a credit score is calculated.",
     "Scoring models weigh payment history most, then how much of your available credit you use, the age of "
     "your accounts, recent applications and the mix of credit types.",
     [("Does checking my own score lower it?", "No, that is a soft inquiry and has no effect."),
      ("How quickly can I raise it?",
       "Paying balances down below 30 percent of limits can help within one or two billing cycles."),
      ("Should I close old cards?", "Usually not; they lengthen your history and add available credit.")]),
    ("What are the main differences between tea and coffee caffeine?",
     "A cup of coffee has roughly twice the caffeine of black tea, and tea's L-theanine tends to give a "
     "calmer, steadier alertness.",
     [("Does green tea have less than black tea?", "Usually a little less, though brewing time matters more."),
      ("Is decaf caffeine-free?", "Not entirely; a decaf coffee still has a few milligrams."),
      ("How much caffeine is too much?",
       "Health agencies cite about 400 milligrams a day as safe for most healthy adults.")]),
    ("Write a short bedtime story about a lighthouse keeper's dog.",
     "Every night Biscuit climbed the spiral stairs behind old Mara, counting the steps by smell: salt, oil, "
     "then the warm brass of the lamp. When fog rolled in one evening, it was Biscuit who barked at the "
     "ship's faint horn, and Mara lit the light just in time.",
     [("Give the ship a name.", "The ship was the Little Heron, a fishing boat coming home late with its nets full."),
      ("Add a happy ending.",
       "The next morning the crew brought Biscuit a fish of his own, and he slept by the lamp till noon."),
      ("Make the last line rhyme.", "And ever since that foggy night, Biscuit guards the harbour light.")]),
    ("How does Git branching work?",
     "A branch is a movable pointer to a commit. Creating one is cheap, and new commits advance the branch you "
     "are on.",
     [("What is the difference between merge and rebase?",
       "Merge joins histories with a merge commit; rebase replays your commits on top of another branch."),
      ("When should I avoid rebasing?", "Never rebase commits that others have already pulled."),
      ("How do I delete a branch?", "git branch -d name deletes a merged branch; -D forces it.")]),
    ("What were the main achievements of the Apollo 11 mission?",
     "In July 1969 Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while Michael "
     "Collins orbited above, and all three returned safely.",
     [("How long were they on the surface?", "About 21 and a half hours, with one moonwalk of two and a half hours."),
      ("What did they bring back?", "About 21.5 kilograms of lunar rock and soil."),
      ("What computer guided them?",
       "The Apollo Guidance Computer, with about 4 kilobytes of erasable memory.")]),
    ("Is it better to rent or buy a home?",
     "It depends on how long you will stay, local price-to-rent ratios, and whether you have savings for a "
     "deposit and repairs. Buying tends to pay off only after five or more years.",
     [("What hidden costs come with buying?",
       "Transfer taxes, legal fees, insurance, maintenance and property taxes."),
      ("Is rent money wasted?", "No more than mortgage interest is; both pay for a place to live."),
      ("How big a deposit should I save?", "Twenty percent avoids mortgage insurance with many lenders.")]),
    ("Give me tips for learning a new language as an adult.",
     "Practise a little every day, learn the thousand most common words first, speak early with a tutor or "
     "exchange partner, and consume media you enjoy in the language.",
     [("How long until I can hold a conversation?",
       "With daily practice, basic conversations are realistic within six to twelve months."),
      ("Are apps enough?", "They build vocabulary, but speaking with people is what builds fluency."),
      ("How do I remember vocabulary?", "Spaced-repetition flashcards, with example sentences on each card.")]),
    ("What is the role of the mitochondria?",
     "Mitochondria produce most of a cell's energy as ATP through cellular respiration.",
     [("Why do they have their own DNA?",
       "They descend from bacteria that were engulfed by an ancestral cell over a billion years ago."),
      ("Which cells have the most?", "Energy-hungry cells such as heart muscle and neurons."),
      ("Is mitochondrial DNA inherited from both parents?", "Almost always only from the mother.")]),
    ("How do I remove a red wine stain from a carpet?",
     "Blot, do not rub. Dab with cold water, then a mix of dish soap and white vinegar, and blot again until "
     "the colour lifts.",
     [("It has already dried.", "Apply a paste of baking soda and water, let it dry, then vacuum."),
      ("Does salt work?", "Salt can soak up a fresh spill, but it will not lift a set stain."),
      ("Is hydrogen peroxide safe?",
       "On light carpets it works well; test a hidden spot first, since it can bleach colour.")]),
    ("What makes a good password?",
     "Length matters most: a passphrase of four or more random words is strong and memorable. Use a "
     "different one for every site.",
     [("How do I remember them all?", "Use a password manager and remember only its master passphrase."),
      ("Is two-factor authentication worth it?",
       "Yes; an authenticator app or security key stops most account takeovers."),
      ("Should I change passwords regularly?", "Only when there is a sign of compromise.")]),
    ("Describe the water cycle.",
     "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and returns to the "
     "sea through rivers and groundwater.",
     [("What is transpiration?", "Water released as vapour from plant leaves, part of the evaporation step."),
      ("How long does water stay in the ocean?", "On average around 3,000 years."),
      ("Does climate change affect the cycle?", "Warmer air holds more moisture, giving heavier downpours.")]),
]

SYSTEM_PROMPTS = ["You are a helpful assistant. Answer concisely.",
                  "You are a friendly tutor who explains things step by step.",
                  "You are a careful assistant; say so when you are unsure.",
                  "Answer as a patient expert, in plain English."]


def sharegpt_conversations(n: int = 40, seed: int = 0) -> list[dict]:
    """`n` Vicuna-style records, each on its own topic (a seeded choice of topic, turns and system prompt)."""
    if not 1 <= n <= len(TOPICS):
        raise ValueError(f"n must be between 1 and {len(TOPICS)} (one topic per conversation), got {n}")
    rng = random.Random(seed)
    topics = rng.sample(range(len(TOPICS)), n)
    turns = [1 + i % 4 for i in range(n)]  # every count from 1 to 4, in a seeded order
    rng.shuffle(turns)
    with_system = set(rng.sample(range(n), max(1, n // 8)))
    records = []
    for i, (topic, count) in enumerate(zip(topics, turns)):
        question, answer, follow_ups = TOPICS[topic]
        conversation = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS)}] if i in with_system else []
        for q, a in [(question, answer), *follow_ups][:count]:
            conversation += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        tag = "".join(rng.choices(string.ascii_letters + string.digits, k=7))
        records.append({"id": f"{tag}_0", "conversations": conversation})
    return records


def write_sharegpt(path: Path | str, n: int = 40, seed: int = 0) -> list[dict]:
    """Write `sharegpt_conversations(n, seed)` to `path` (a JSON list for `.json`, else JSON lines)."""
    path = Path(path)
    records = sharegpt_conversations(n, seed)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records

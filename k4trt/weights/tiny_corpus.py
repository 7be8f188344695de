"""English text the tiny model's sentencepiece tokenizer is trained on: video-prompt-like sentences, so
prompts in tests split into real sub-word pieces rather than single characters."""

TINY_CORPUS = """\
A red panda climbs a snowy pine tree at sunrise, cinematic lighting.
A golden retriever runs along the beach while waves crash behind it.
An old man plays the violin on a busy city street in the rain.
Aerial view of a river winding through a green valley in autumn.
An astronaut floats inside a space station, looking down at the Earth.
Close-up of hot coffee being poured into a white cup, slow motion.
A bustling night market in Tokyo with neon signs and steam rising from food stalls.
A small wooden boat sails across a calm lake surrounded by tall mountains.
Children fly colourful kites in a park on a windy spring afternoon.
A chef slices fresh vegetables on a wooden board in a bright, sunny kitchen.
A vintage red car drives down an empty desert highway at dusk.
Thousands of lanterns drift into the night sky above a quiet village.
A ballet dancer spins on a stage lit by a single warm spotlight.
Waves of a stormy ocean crash against a lighthouse on a rocky cliff.
A cat sleeps on a windowsill while snow falls softly outside.
A hiker stands on a mountain ridge above a sea of clouds.
A time-lapse of flowers blooming in a garden, from bud to full blossom.
A scientist in a white coat mixes glowing blue liquids in a laboratory.
A herd of elephants walks slowly across the savanna under a setting sun.
A young woman reads a book in a cozy cafe while rain streaks the glass.
A futuristic city with flying cars and tall glass towers at night.
Fireworks explode in bright colours over a river in the summer.
A hummingbird hovers beside a red flower, its wings a blur.
A drone shot of a tropical island with white sand and turquoise water.
A boy rides his bicycle through puddles on a country road.
An ancient temple hidden in a misty jungle, vines covering the stones.
A tsunami wave rises over a coastal town, dramatic and dark.
Two friends share a picnic under a large oak tree in a meadow.
A panda wearing glasses explains mathematics on a chalkboard.
Snowflakes land on a dark wool scarf, macro photography.
A steam train crosses a stone bridge over a deep green gorge.
A jazz band performs in a dim club full of smoke and soft light.
A fox runs through a frozen forest, leaving tracks in fresh snow.
Slow motion of a water droplet falling into a still pond.
A robot walks through a field of sunflowers, curious and gentle.
A busy train station at rush hour, people hurrying in every direction.
The northern lights dance in green waves above a frozen lake.
A potter shapes wet clay on a spinning wheel, hands covered in mud.
A man in a suit runs through the rain holding a black umbrella.
A sailing ship battles huge waves during a storm at sea.
A dog catches a frisbee in mid-air on a sunny lawn.
Sunlight streams through the leaves of a dense forest in the morning.
A street artist paints a colourful mural on a brick wall.
A close-up portrait of an old fisherman with a grey beard, smiling.
Hot air balloons rise over a valley of vineyards at dawn.
A girl blows bubbles that shine with rainbow colours in the wind.
A volcano erupts at night, rivers of orange lava flowing down.
Cinematic shot, 4k, shallow depth of field, soft golden light.
The camera slowly pans from left to right across a quiet harbour.
In 1920, a black and white film shows people dancing in a hall.
Rain drops on a car window, city lights blurred in the background.
A horse gallops along a misty shoreline in the early morning.
Penguins waddle across the ice and dive one by one into the sea.
A candle flickers on a wooden table in a dark room.
A skateboarder performs a trick in an empty concrete skate park.
Autumn leaves swirl in the wind along a narrow cobblestone street.
"""

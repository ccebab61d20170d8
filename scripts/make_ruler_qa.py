# Writes src/eval/ruler/data/qa_squad.json and qa_hotpotqa.json (the built-in QA sets,
# written for wildlong; every name and fact is invented). Run from that folder:
#   cd src/eval/ruler/data && python3 ../../../../scripts/make_ruler_qa.py
import json
# (title, paragraph, [(question, [answers])])
squad = [
("Harbor of Velmora", "The harbor of Velmora was dredged in 1872 to admit steamships of the Northern Line. Before the dredging, ships anchored two miles offshore and passengers were rowed in by local boatmen. The work was financed by a loan from the merchant Ottilie Brandt, who was repaid in salt tariffs over nineteen years. The new quay, built of grey basalt from the Karsk quarry, is still in use today.",
 [("In what year was the harbor of Velmora dredged?", ["1872"]), ("Who financed the dredging of the Velmora harbor?", ["Ottilie Brandt", "the merchant Ottilie Brandt"]), ("From which quarry did the basalt for the new quay come?", ["the Karsk quarry", "Karsk"])]),
("Tessaline bridge", "The Tessaline bridge crosses the river Oum at its narrowest point, a gap of 214 metres. It was designed by the engineer Dario Quenn and opened to traffic in the spring of 1931. The bridge has five arches of reinforced concrete, and the central arch is wide enough for barges carrying timber to pass beneath it. A toll of two copper coins was charged until 1950.",
 [("Which river does the Tessaline bridge cross?", ["Oum", "the river Oum"]), ("How many arches does the Tessaline bridge have?", ["five"]), ("Who designed the Tessaline bridge?", ["Dario Quenn"])]),
("Marrow Hill observatory", "The Marrow Hill observatory houses a refracting telescope with a lens of 61 centimetres, ground by the optician Liesl Varga. The observatory was founded by the astronomical society of Penwick, whose members raised the money through public lectures. Its most notable discovery was the comet later named Penwick-Aldous, first seen on a clear night in October 1958.",
 [("Who ground the lens of the Marrow Hill telescope?", ["Liesl Varga"]), ("What comet was discovered at the Marrow Hill observatory?", ["Penwick-Aldous"]), ("How did the society raise money for the observatory?", ["through public lectures", "public lectures"])]),
("Orvane glassworks", "The Orvane glassworks produced bottles, window panes and laboratory flasks for almost a century. Its founder, Benedek Sarr, brought glassblowers from the coastal town of Lissom and housed them in a row of cottages beside the furnace. The works closed in 1968 after a fire destroyed the main furnace hall. The cottages survive and now hold a small museum of coloured glass.",
 [("Who founded the Orvane glassworks?", ["Benedek Sarr"]), ("From which town did the glassblowers come?", ["Lissom"]), ("Why did the Orvane glassworks close?", ["a fire destroyed the main furnace hall", "fire"])]),
("The Quillan codex", "The Quillan codex is a manuscript of 212 vellum leaves containing recipes for inks and dyes. It was copied by a scribe who signs himself only as Brother Amund, and it is bound in boards covered with red goatskin. The codex was bought by the Halvard library in 1904 from a bookseller in the town of Ostry, who had found it inside a locked chest.",
 [("How many leaves does the Quillan codex have?", ["212"]), ("What does the Quillan codex contain?", ["recipes for inks and dyes"]), ("Which library bought the Quillan codex?", ["the Halvard library", "Halvard library", "Halvard"])]),
("Fenwick rail tunnel", "The Fenwick rail tunnel runs for 6.4 kilometres beneath the Sollen ridge and shortened the journey between Arbury and Cole Marsh by nearly an hour. Digging began from both ends in 1899, and the two crews met in the middle in 1903, only eleven centimetres out of line. The chief surveyor, Maud Ellery, received a gold medal from the railway company.",
 [("How long is the Fenwick rail tunnel?", ["6.4 kilometres"]), ("Which ridge does the Fenwick tunnel pass beneath?", ["the Sollen ridge", "Sollen"]), ("Who was the chief surveyor of the Fenwick tunnel?", ["Maud Ellery"])]),
("Lake Brisco fisheries", "Lake Brisco supports a fishery for a silver trout known locally as the shadefin. Catches are limited by a quota that the lakeside villages agree on every March. In 1987 the quota was cut by half after a survey found that the spawning beds near the mouth of the Tarn stream had silted up. The beds were cleared by volunteers, and the population recovered within six years.",
 [("What is the silver trout of Lake Brisco called locally?", ["shadefin", "the shadefin"]), ("When do the villages agree on the fishing quota?", ["every March", "March"]), ("Near which stream had the spawning beds silted up?", ["the Tarn stream", "Tarn"])]),
("Aurel Costa", "Aurel Costa was a cartographer who spent eleven years mapping the salt marshes of the Ebben delta. His maps were the first to show the channels at both high and low tide, using blue ink for water that never drained. He worked from a flat-bottomed boat called the Heron, which he had built himself. His complete atlas was printed in 1846 in an edition of 300 copies.",
 [("What did Aurel Costa map?", ["the salt marshes of the Ebben delta", "salt marshes"]), ("What was the name of Aurel Costa's boat?", ["the Heron", "Heron"]), ("How many copies of Costa's atlas were printed?", ["300"])]),
("Grainhall cooperative", "The Grainhall cooperative was formed in 1921 by forty-two farmers who wanted to share a steam threshing machine. Members paid an entry fee of one sack of barley and received a vote at the yearly meeting. By 1950 the cooperative owned three mills and a warehouse at the railway station of Dunmore. It still operates, though it now deals mostly in animal feed.",
 [("How many farmers formed the Grainhall cooperative?", ["forty-two"]), ("What was the entry fee of the Grainhall cooperative?", ["one sack of barley"]), ("Where was the cooperative's warehouse?", ["at the railway station of Dunmore", "Dunmore"])]),
("Saint Ysolde's bells", "The church of Saint Ysolde has a ring of eight bells, the heaviest of which weighs 1,140 kilograms and is called Great Agnes. The bells were cast in 1766 by the foundry of Jorin Hask, whose mark, a small anchor, is visible on each rim. They were rehung on a steel frame in 1992 because the old oak frame had begun to crack.",
 [("How many bells does the church of Saint Ysolde have?", ["eight"]), ("What is the heaviest bell called?", ["Great Agnes"]), ("Why were the bells rehung in 1992?", ["the old oak frame had begun to crack"])]),
("Kettering pump station", "The pump station at Kettering Fen drains about 4,000 hectares of farmland that lie below sea level. Its two original beam engines were built in 1833 and worked until they were replaced by diesel pumps in 1948. One beam engine has been restored by a group of volunteers and is run under steam on the first Sunday of each summer month.",
 [("How much farmland does the Kettering pump station drain?", ["about 4,000 hectares", "4,000 hectares"]), ("When were the beam engines replaced?", ["1948", "in 1948"]), ("When is the restored beam engine run under steam?", ["on the first Sunday of each summer month", "the first Sunday of each summer month"])]),
("Nadia Perel", "Nadia Perel was a chemist who developed a dye made from the roots of the madder plant that did not fade in sunlight. She patented the process in 1911 and sold the rights to the textile firm of Wexley and Daughters. With the proceeds she founded a school for girls in the mill town of Harrowgate, which she ran until her death in 1949.",
 [("What plant was Nadia Perel's dye made from?", ["madder", "the madder plant"]), ("To which firm did Perel sell the rights?", ["Wexley and Daughters"]), ("Where did Nadia Perel found a school?", ["Harrowgate", "the mill town of Harrowgate"])]),
("Coldwater lighthouse", "The Coldwater lighthouse stands on a granite skerry eight kilometres from the mainland. Its light, a paraffin lamp magnified by a lens of 24 glass prisms, could be seen from 32 kilometres away. The keepers were relieved by boat every fortnight, weather permitting. The last keeper, Tobias Wren, left in 1981 when the light was automated.",
 [("What does the Coldwater lighthouse stand on?", ["a granite skerry"]), ("From how far away could the Coldwater light be seen?", ["32 kilometres"]), ("Who was the last keeper of the Coldwater lighthouse?", ["Tobias Wren"])]),
("Pellham market charter", "The market of Pellham received its charter in 1284 from the Countess Mathilde, allowing a market every Thursday and a fair on the feast of Saint Bride. The charter fixed the toll for a cartload of goods at one penny. The original document, sealed with green wax, is kept in the town hall in a case that is opened once a year.",
 [("Who granted Pellham its market charter?", ["the Countess Mathilde", "Countess Mathilde", "Mathilde"]), ("On which day of the week was the Pellham market held?", ["Thursday", "every Thursday"]), ("What colour was the wax seal of the charter?", ["green"])]),
("Hollin Moor weather station", "The weather station on Hollin Moor has recorded rainfall daily since 1869, making it one of the longest unbroken records in the region. The readings were taken for fifty-one years by the schoolmaster Edwin Carrow and then by his daughter Ruth. The wettest day on record, 1 August 1917, brought 191 millimetres of rain and washed away the footbridge at Brackley.",
 [("Since when has the Hollin Moor station recorded rainfall?", ["1869", "since 1869"]), ("Who took the readings for fifty-one years?", ["Edwin Carrow", "the schoolmaster Edwin Carrow"]), ("How much rain fell on the wettest day on record?", ["191 millimetres"])]),
("Verrin orchards", "The Verrin valley is known for a late apple called the Winter Queen, which keeps until April if stored in a cool loft. The variety was found as a seedling in 1808 in the garden of the miller Josiah Platt. Its fruit is hard and sour when picked but becomes sweet after two months in storage. Each October the valley holds a pressing festival.",
 [("What is the late apple of the Verrin valley called?", ["the Winter Queen", "Winter Queen"]), ("In whose garden was the Winter Queen found?", ["Josiah Platt", "the miller Josiah Platt"]), ("When does the Verrin valley hold its pressing festival?", ["October", "Each October"])]),
("Sorrel Street fire", "The Sorrel Street fire of 1790 began in a bakery and destroyed sixty houses in a single night. Afterwards the town council ruled that all new houses must be built of brick with slate roofs, and it bought the town's first fire engine, a hand pump mounted on a cart. The engine was named Vigilance and is displayed today in the entrance of the fire station.",
 [("Where did the Sorrel Street fire begin?", ["in a bakery", "a bakery"]), ("How many houses did the fire destroy?", ["sixty"]), ("What was the town's first fire engine named?", ["Vigilance"])]),
("Imbris weaving", "Imbris cloth is a heavy woollen fabric woven with a pattern of small diamonds. Weavers in the hill village of Caddon Mor have made it for at least three centuries. The wool comes from a local breed of black-faced sheep, and it is dyed with lichen gathered from the boulders above the village, which gives it a rusty orange colour.",
 [("What pattern is Imbris cloth woven with?", ["small diamonds", "a pattern of small diamonds"]), ("In which village is Imbris cloth made?", ["Caddon Mor"]), ("What is Imbris wool dyed with?", ["lichen"])]),
("Whitlow canal", "The Whitlow canal links the coal pits at Hensby with the river port of Marle, a distance of 27 kilometres with fourteen locks. It was opened in 1797, and for forty years horse-drawn barges carried coal along it. The canal lost its trade to the railway after 1840, but a section of 9 kilometres was reopened for pleasure boats in 2003.",
 [("How many locks does the Whitlow canal have?", ["fourteen"]), ("Which river port does the canal link to Hensby?", ["Marle"]), ("When was a section reopened for pleasure boats?", ["2003", "in 2003"])]),
("Otto Vallin", "Otto Vallin was a clockmaker whose tower clocks can still be found in eleven towns along the coast. His largest clock, in the harbour tower of Sennet, has a dial four metres across and strikes the hours on a bell taken from a wrecked ship. Vallin trained as an apprentice in the workshop of his uncle, Gustav Holm, for seven years.",
 [("In how many towns can Vallin's tower clocks be found?", ["eleven"]), ("Where is Otto Vallin's largest clock?", ["in the harbour tower of Sennet", "Sennet"]), ("Who trained Otto Vallin?", ["Gustav Holm", "his uncle, Gustav Holm"])]),
("Ambry Island birds", "Ambry Island is a breeding ground for the grey-backed tern, which arrives in late April and leaves in September. The island has been a reserve since 1936, and visitors may land only between July and August with a permit from the warden. In the last count, 2,300 pairs of terns were nesting on the shingle at the island's southern tip.",
 [("Which bird breeds on Ambry Island?", ["the grey-backed tern", "grey-backed tern"]), ("Since when has Ambry Island been a reserve?", ["1936", "since 1936"]), ("How many pairs of terns were counted?", ["2,300", "2,300 pairs"])]),
("Rindmoor cheese", "Rindmoor cheese is made only in the parish of Lowther Cross from the milk of cows grazing on the water meadows. It is pressed in cloth, rubbed with salt and ash, and aged in a cellar for nine months. The recipe was written down in 1702 by the dairywoman Hester Gaunt, whose notebook is kept by the parish church.",
 [("Where is Rindmoor cheese made?", ["Lowther Cross", "the parish of Lowther Cross"]), ("How long is Rindmoor cheese aged?", ["nine months"]), ("Who wrote down the recipe for Rindmoor cheese?", ["Hester Gaunt", "the dairywoman Hester Gaunt"])]),
("Carrick Row printing", "The Carrick Row press printed the town's first newspaper, the Weekly Lantern, from 1812. Its compositor, Felix Dorne, set every page by hand from a case of type bought second-hand in the capital. The press was powered by a treadle until 1870, when a small steam engine was installed. The last issue of the Weekly Lantern appeared in 1939.",
 [("What was the town's first newspaper called?", ["the Weekly Lantern", "Weekly Lantern"]), ("Who set the pages by hand?", ["Felix Dorne"]), ("When did the last issue of the newspaper appear?", ["1939", "in 1939"])]),
("Thornby school garden", "The school at Thornby keeps a garden of medicinal herbs planted in 1956 by the teacher Clara Monk. The garden is laid out in twelve square beds, one for each month, holding plants that flower in that month. Pupils look after the beds in pairs and sell dried lavender at the spring fair to pay for new seeds.",
 [("Who planted the Thornby herb garden?", ["Clara Monk", "the teacher Clara Monk"]), ("How many beds does the garden have?", ["twelve"]), ("What do pupils sell to pay for new seeds?", ["dried lavender"])]),
]
# HotpotQA-style bridge pairs: (title1, sentences1, title2, sentences2, question, answer)
hotpot = [
("Corrin Point Light", ["Corrin Point Light is a lighthouse on the western cape of the island of Hale. ", "It was designed by the architect Maren Holt and first lit in 1862."],
 "Maren Holt", ["Maren Holt was an architect known for coastal buildings. ", "She was born in the city of Askeby and studied in Vienna."],
 "In which city was the designer of Corrin Point Light born?", "Askeby"),
("The Glass Orchard", ["The Glass Orchard is a novel published in 1934. ", "It was written by Ilse Marten, who based it on her childhood in a fruit-growing valley."],
 "Ilse Marten", ["Ilse Marten was a novelist and translator. ", "Before writing fiction she worked as a pharmacist in the town of Grevbrook."],
 "In which town did the author of The Glass Orchard work as a pharmacist?", "Grevbrook"),
("Halden Rovers", ["Halden Rovers is a football club founded in 1897. ", "The club plays its home games at Lindqvist Park."],
 "Lindqvist Park", ["Lindqvist Park is a stadium with room for 9,500 spectators. ", "It was named after the shipowner Axel Lindqvist, who donated the land."],
 "Who donated the land for the home ground of Halden Rovers?", "Axel Lindqvist"),
("Sorrow of the Tides", ["Sorrow of the Tides is an opera in three acts. ", "Its music was composed by Piet Oberlin and it premiered in 1888."],
 "Piet Oberlin", ["Piet Oberlin was a composer and organist. ", "He held the post of organist at the cathedral of Veldmark for thirty years."],
 "At which cathedral was the composer of Sorrow of the Tides the organist?", "the cathedral of Veldmark"),
("Brannock Mill", ["Brannock Mill is a water mill on the river Sedge. ", "It is owned by the Tallow Trust, which restored it in 1979."],
 "Tallow Trust", ["The Tallow Trust is a charity that preserves rural buildings. ", "It was founded in 1952 by the historian Agnes Tallow."],
 "Who founded the organisation that owns Brannock Mill?", "Agnes Tallow"),
("Merrow Expedition", ["The Merrow Expedition of 1903 explored the upper course of the river Kanza. ", "It was led by the naturalist Caspar Duvel."],
 "Caspar Duvel", ["Caspar Duvel was a naturalist who collected beetles. ", "His collection of 40,000 specimens is held by the museum in Stennis."],
 "Where is the beetle collection of the leader of the Merrow Expedition held?", "Stennis"),
("Vane Street Bakery", ["Vane Street Bakery is the oldest bakery in Colbridge. ", "It was opened in 1841 by the baker Thomas Ruel."],
 "Thomas Ruel", ["Thomas Ruel was a baker and town councillor. ", "He was born in the fishing village of Penhallow."],
 "In which village was the founder of Vane Street Bakery born?", "Penhallow"),
("The Amber Room Quartet", ["The Amber Room Quartet is a string quartet formed in 1971. ", "Its first violinist was Yelena Strand."],
 "Yelena Strand", ["Yelena Strand is a violinist and teacher. ", "She plays a violin made in 1721 by the luthier Matteo Ardin."],
 "Who made the violin played by the first violinist of The Amber Room Quartet?", "Matteo Ardin"),
("Kestrel Pass", ["Kestrel Pass is a mountain pass at 2,140 metres. ", "The road over it was built under the direction of the engineer Lorenz Abt."],
 "Lorenz Abt", ["Lorenz Abt was a road engineer. ", "After retiring he wrote a history of the postal service called Roads of Paper."],
 "What book did the engineer of the road over Kestrel Pass write?", "Roads of Paper"),
("Dovecote Theatre", ["The Dovecote Theatre is a playhouse in the town of Ashby Vale. ", "Its first director was the actor Rupert Cane."],
 "Rupert Cane", ["Rupert Cane was an actor and director. ", "He was famous for playing the role of the miser in the comedy The Iron Purse."],
 "In which comedy was the first director of the Dovecote Theatre famous for a role?", "The Iron Purse"),
("Ferrow Reservoir", ["Ferrow Reservoir supplies water to the city of Lanark Bay. ", "Its dam was designed by the firm of Oakes and Pender."],
 "Oakes and Pender", ["Oakes and Pender was an engineering firm. ", "It had its head office in the city of Morrowgate."],
 "In which city did the firm that designed the Ferrow Reservoir dam have its head office?", "Morrowgate"),
("Silver Fern Award", ["The Silver Fern Award is a prize for young poets. ", "It was first awarded in 1965 to Ada Quill."],
 "Ada Quill", ["Ada Quill was a poet and schoolteacher. ", "Her best-known collection is titled Lanterns on the Water."],
 "What is the best-known collection of the first winner of the Silver Fern Award?", "Lanterns on the Water"),
]
out = {"version": "wildlong-builtin-1", "data": []}
for i,(title, para, qas) in enumerate(squad):
    ps = {"context": para, "qas": []}
    for j,(q, ans) in enumerate(qas):
        for a in ans:
            assert a in para, (title, a)
        ps["qas"].append({"id": f"wl-squad-{i:02d}-{j}", "question": q, "is_impossible": False,
                          "answers": [{"text": a, "answer_start": para.index(a)} for a in ans]})
    out["data"].append({"title": title, "paragraphs": [ps]})
json.dump(out, open("qa_squad.json", "w"), indent=1, ensure_ascii=False)
hp = []
for i,(t1,s1,t2,s2,q,a) in enumerate(hotpot):
    assert a in "".join(s2) or a in "".join(s1), (q,a)
    hp.append({"_id": f"wl-hotpot-{i:02d}", "question": q, "answer": a, "type": "bridge",
               "supporting_facts": [[t1, 1], [t2, 1]], "context": [[t1, s1], [t2, s2]]})
json.dump(hp, open("qa_hotpotqa.json", "w"), indent=1, ensure_ascii=False)
print(sum(len(x[2]) for x in squad), len(hotpot))

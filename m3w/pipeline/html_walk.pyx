# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The per-node loop of `html_extract`'s walk, compiled: one pre-order pass over lexbor's DOM by its C structs.

A page has ~1,700 nodes, 38% of them whitespace between tags; as Python over selectolax nodes this loop was half of
extraction. Here every node costs a few struct reads: no node object, no attribute dict, no string for whitespace.
What the loop decides stays in `html_extract`, called through `Vocabulary` and the walker: what a tag is (skipped,
a container, media; its block kind), what a class/id/role names (`classify`), whether a hidden-looking element is
hidden, whether furniture goes, how media and <noscript> become blocks, how pending text becomes a block. Those
callbacks receive ordinary selectolax nodes and attribute dicts, made only for the few elements that need them.

lexbor's structs are declared below as selectolax 1.0.2 builds them (lexbor's source/lexbor/dom/interfaces/node.h,
element.h, attr.h, character_data.h; core/str.h): only the leading fields this walk reads, in their order. Names
of elements and attributes come from lexbor's own functions, looked up in selectolax's extension module (which
exports lexbor's symbols) when this module is imported. `_check_layout` then walks a known page both ways, by
these structs and by selectolax's API, and refuses to load on any difference: pyproject pins selectolax to the
version whose layout this is.
"""

from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

cdef extern from *:
    """
    #include <dlfcn.h>
    typedef struct m3w_lxb_str { unsigned char *data; size_t length; } m3w_lxb_str;
    typedef struct m3w_lxb_node {
        void *events;
        uintptr_t local_name;
        uintptr_t prefix;
        uintptr_t ns;
        void *owner_document;
        struct m3w_lxb_node *next;
        struct m3w_lxb_node *prev;
        struct m3w_lxb_node *parent;
        struct m3w_lxb_node *first_child;
        struct m3w_lxb_node *last_child;
        void *user;
        int type;
    } m3w_lxb_node;
    typedef struct m3w_lxb_attr {
        m3w_lxb_node node;
        uintptr_t upper_name;
        uintptr_t qualified_name;
        m3w_lxb_str *value;
        void *owner;
        struct m3w_lxb_attr *next;
    } m3w_lxb_attr;
    typedef struct m3w_lxb_element {
        m3w_lxb_node node;
        uintptr_t upper_name;
        uintptr_t qualified_name;
        m3w_lxb_str *is_value;
        m3w_lxb_attr *first_attr;
    } m3w_lxb_element;
    typedef struct m3w_lxb_character_data { m3w_lxb_node node; m3w_lxb_str data; } m3w_lxb_character_data;
    /* selectolax.lexbor.LexborNode (selectolax/lexbor.pxd): a Cython object with cdef methods, so a vtable first. */
    typedef struct m3w_selectolax_node {
        PyObject_HEAD
        void *vtab;
        m3w_lxb_node *node;
        PyObject *parser;
        int is_fragment_root;
        int is_template_content;
    } m3w_selectolax_node;
    typedef const unsigned char *(*m3w_lxb_name_fn)(void *, size_t *);
    enum { M3W_LXB_ELEMENT = 1, M3W_LXB_TEXT = 3 };
    """
    ctypedef struct m3w_lxb_str:
        unsigned char *data
        size_t length
    ctypedef struct m3w_lxb_node:
        m3w_lxb_node *next
        m3w_lxb_node *parent
        m3w_lxb_node *first_child
        int type
    ctypedef struct m3w_lxb_attr:
        m3w_lxb_str *value
        m3w_lxb_attr *next
    ctypedef struct m3w_lxb_element:
        m3w_lxb_attr *first_attr
    ctypedef struct m3w_lxb_character_data:
        m3w_lxb_str data
    ctypedef struct m3w_selectolax_node:
        m3w_lxb_node *node
    ctypedef const unsigned char *(*m3w_lxb_name_fn)(void *, size_t *)
    enum:
        M3W_LXB_ELEMENT
        M3W_LXB_TEXT
    void *dlopen(const char *path, int flags)
    void *dlsym(void *handle, const char *name)
    int RTLD_NOW
    int RTLD_NOLOAD

cdef m3w_lxb_name_fn element_name_fn = NULL  # lxb_dom_element_qualified_name
cdef m3w_lxb_name_fn attr_name_fn = NULL  # lxb_dom_attr_qualified_name
cdef object LexborNode = None


cdef void _bind_lexbor() except *:
    """Find lexbor's name functions in selectolax's extension module, which exports them."""
    global element_name_fn, attr_name_fn, LexborNode
    import selectolax.lexbor as lexbor_module

    path = lexbor_module.__file__.encode()
    handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        raise ImportError(f"m3w.pipeline.html_walk: cannot open {lexbor_module.__file__}")
    element_name_fn = <m3w_lxb_name_fn>dlsym(handle, "lxb_dom_element_qualified_name")
    attr_name_fn = <m3w_lxb_name_fn>dlsym(handle, "lxb_dom_attr_qualified_name")
    if element_name_fn == NULL or attr_name_fn == NULL:
        raise ImportError(f"m3w.pipeline.html_walk: {lexbor_module.__file__} exports no lexbor name functions")
    LexborNode = lexbor_module.LexborNode


cdef inline m3w_lxb_node *node_of(object node):
    return (<m3w_selectolax_node *><PyObject *>node).node


cdef object wrap(m3w_lxb_node *node, object parser):
    """A selectolax node for a DOM node, as selectolax's own LexborNode.new makes one."""
    wrapped = LexborNode.__new__(LexborNode)
    (<m3w_selectolax_node *><PyObject *>wrapped).node = node
    wrapped.parser = parser
    return wrapped


cdef inline str decode(const unsigned char *data, size_t length):
    # As selectolax decodes names, values and text: bytes lexbor passed through undecoded become U+FFFD.
    return PyUnicode_DecodeUTF8(<const char *>data, length, "replace")


cdef inline bint is_whitespace(const unsigned char *data, size_t length) noexcept:
    """Only HTML ASCII whitespace (selectolax's is_empty_text_node): a word break between tags."""
    cdef size_t i
    if data == NULL:
        return True
    for i in range(length):
        if data[i] not in (0x20, 0x09, 0x0A, 0x0C, 0x0D):
            return False
    return True


cdef inline bint name_is(const unsigned char *name, size_t length, const char *expected, size_t expected_length):
    return length == expected_length and memcmp(name, expected, length) == 0


cdef object attr_value(m3w_lxb_attr *attr):
    if attr.value == NULL or attr.value.data == NULL:
        return None
    return decode(attr.value.data, attr.value.length)


cdef dict attributes(m3w_lxb_node *node):
    """An element's attributes as selectolax's `attributes` gives them: qualified names, None for no value."""
    cdef dict out = {}
    cdef m3w_lxb_attr *attr = (<m3w_lxb_element *>node).first_attr
    cdef size_t length = 0
    cdef const unsigned char *name
    while attr != NULL:
        name = attr_name_fn(attr, &length)
        out[decode(name, length)] = attr_value(attr)
        attr = attr.next
    return out


cdef inline bint is_python_space(unsigned int c) noexcept:
    """What str.isspace() (and so str.strip()) says of a code point: CPython's _PyUnicode_IsWhitespace."""
    if c < 0x80:
        return 0x09 <= c <= 0x0D or 0x1C <= c <= 0x20
    return (
        c == 0x85 or c == 0xA0 or c == 0x1680 or 0x2000 <= c <= 0x200A or c == 0x2028 or c == 0x2029
        or c == 0x202F or c == 0x205F or c == 0x3000
    )


cdef Py_ssize_t stripped_length(const unsigned char *data, size_t length) except -1:
    """len(text.strip()) of a text node's UTF-8 bytes, as selectolax decodes them, without making the string: code
    points are counted as they are decoded. Bytes that are not well-formed UTF-8 (which decoding replaces) are left
    to Python's decoder."""
    cdef size_t i = 0, j, width
    cdef Py_ssize_t count = 0, first = -1, last = 0  # code points; first and one past the last non-space one
    cdef unsigned int c  # a code point
    cdef unsigned char lead, low, high
    while i < length:
        lead = data[i]
        if lead < 0x80:
            c, width = lead, 1
        else:
            # Well-formed sequences (Unicode 15, table 3-7): the second byte's range depends on the lead byte.
            low, high = 0x80, 0xBF
            if 0xC2 <= lead <= 0xDF:
                c, width = lead & 0x1F, 2
            elif 0xE0 <= lead <= 0xEF:
                c, width = lead & 0x0F, 3
                if lead == 0xE0:
                    low = 0xA0
                elif lead == 0xED:
                    high = 0x9F
            elif 0xF0 <= lead <= 0xF4:
                c, width = lead & 0x07, 4
                if lead == 0xF0:
                    low = 0x90
                elif lead == 0xF4:
                    high = 0x8F
            else:
                return len(decode(data, length).strip())
            if i + width > length or not (low <= data[i + 1] <= high):
                return len(decode(data, length).strip())
            c = (c << 6) | (data[i + 1] & 0x3F)
            for j in range(i + 2, i + width):
                if not (0x80 <= data[j] <= 0xBF):
                    return len(decode(data, length).strip())
                c = (c << 6) | (data[j] & 0x3F)
        i += width
        if not is_python_space(c):
            if first < 0:
                first = count
            last = count + 1
        count += 1
    return last - first if first >= 0 else 0


def text_size(node) -> int:
    """Characters of text under a node, each text node stripped: len(node.text(deep=True, strip=True,
    skip_empty=True)), without building that text."""
    cdef m3w_lxb_node *top = node_of(node)
    cdef m3w_lxb_node *at = top.first_child
    cdef m3w_lxb_str *data
    cdef Py_ssize_t total = 0
    while at != NULL:
        if at.type == M3W_LXB_TEXT:
            data = &(<m3w_lxb_character_data *>at).data
            if not is_whitespace(data.data, data.length):
                total += stripped_length(data.data, data.length)
        if at.first_child != NULL:
            at = at.first_child
            continue
        while at != top and at.next == NULL:
            at = at.parent
        if at == top:
            break
        at = at.next
    return total


# ------------------------------------------------------------------------------------------------ tag names

cdef enum:
    TAG_SLOTS = 1024  # open addressing over a page's ~50 and a crawl's few hundred distinct tag names
    TAG_NAME_MAX = 24

cdef struct TagSlot:
    size_t length  # 0: free
    unsigned char name[TAG_NAME_MAX]
    PyObject *tag  # the name as str, owned by Vocabulary.owned (or .uncached)
    int action
    PyObject *block  # the block kind, or NULL for an inline element
    int level  # heading level
    bint meaningful  # classified even without attributes


cdef class Vocabulary:
    """What the walk needs to know about tags (from `html_extract`'s tables) and the page-independent callbacks.
    Tag facts are cached per name in C: the walk asks for every element."""

    cdef TagSlot slots[TAG_SLOTS]
    cdef int used
    cdef list owned
    cdef str uncached  # the name of the last tag the cache did not take, alive until the next such lookup
    cdef dict actions, blocks
    cdef frozenset meaningful
    cdef object classify, text_block, hidden_by
    cdef readonly int skip, container
    cdef str paragraph, line_break

    def __init__(
        self, dict actions, int skip, int container, dict blocks, meaningful, str line_break,
        classify, text_block, hidden_by,
    ):
        """`actions`: tag → walk action (skip, container or special; a tag it does not name is a container);
        `blocks`: block element tag → block kind; `meaningful`: tags classified even without attributes;
        `line_break`: the text a <br> adds; `classify(tag, cls, id, role, itemprop)` → (looks like furniture,
        header-like, content hint); `text_block(owner, dom, text, kind, link_chars, level)` → a text block;
        `hidden_by(aria_hidden, style)` for elements that carry either."""
        self.actions, self.skip, self.container = actions, skip, container
        self.blocks, self.meaningful = blocks, frozenset(meaningful)
        self.classify, self.text_block, self.hidden_by = classify, text_block, hidden_by
        self.owned, self.used, self.paragraph, self.line_break = [], 0, "paragraph", line_break

    cdef TagSlot *lookup(self, const unsigned char *name, size_t length, TagSlot *scratch) except NULL:
        """The facts of a tag by its name's bytes; `scratch` holds them for names the cache does not take."""
        cdef size_t h = 14695981039346656037ULL, i
        cdef TagSlot *slot
        for i in range(length):
            h = (h ^ name[i]) * 1099511628211ULL
        if 0 < length < TAG_NAME_MAX:
            i = h % TAG_SLOTS
            while self.slots[i].length:
                slot = &self.slots[i]
                if slot.length == length and memcmp(slot.name, name, length) == 0:
                    return slot
                i = (i + 1) % TAG_SLOTS
            if self.used < TAG_SLOTS // 2:
                self.used += 1
                slot = &self.slots[i]
                tag = decode(name, length)
                self.owned.append(tag)
                self.fill(slot, tag)
                memcpy(slot.name, name, length)
                slot.length = length
                return slot
        self.uncached = decode(name, length)
        self.fill(scratch, self.uncached)
        return scratch

    cdef void fill(self, TagSlot *slot, str tag) except *:
        block = self.blocks.get(tag)  # a value of self.blocks: alive as long as this vocabulary
        slot.tag = <PyObject *>tag
        slot.action = self.actions.get(tag, self.container)
        slot.block = NULL
        slot.level = 0
        if block is not None:
            slot.block = <PyObject *>block
            if block == "heading":
                slot.level = int(tag[1])
        slot.meaningful = tag in self.meaningful


# ------------------------------------------------------------------------------------------------ the walk

cdef int flush_text(
    Vocabulary vocab, list blocks, list pieces, str kind, Py_ssize_t owner, int level, Py_ssize_t dom,
    int link_chars,
) except -1:
    """The pending text pieces of a block element → one text block (none if it is only whitespace); clears them.
    Whitespace runs become one space; a <br> ends a line (in <pre>, every character stays)."""
    cdef str raw = "".join(pieces)
    cdef str text
    del pieces[:]  # in place: the walker's noscript() reads this list
    if kind == "code":
        text = raw.replace(vocab.line_break, "\n").strip("\n")
    elif vocab.line_break in raw:
        lines = [" ".join(line.split()) for line in raw.split(vocab.line_break)]
        text = "\n".join([line for line in lines if line])
    else:
        text = " ".join(raw.split())
    if text and not text.isspace():
        blocks.append(vocab.text_block(owner, dom, text, kind, min(link_chars, len(text)), level))
    return 0


cdef struct Frame:
    m3w_lxb_node *node
    Py_ssize_t idx  # its element index (the enclosing one for inline elements)
    bint is_link
    bint saved  # a block element: the block state below is restored at its end
    Py_ssize_t owner
    PyObject *kind
    int level
    Py_ssize_t dom


def walk(
    root, walker, Vocabulary vocab, list tags, list parents, list hints, list blocks, list pieces,
    Py_ssize_t max_depth, bint main_content,
):
    """Pre-order walk of `root`'s subtree (`root` itself is element 0, already recorded by the caller) into
    `blocks`, recording block elements in `tags` / `parents` / `hints`. `pieces` is the walker's pending text.
    The walker supplies `image(node, attrs, owner, linked)`, `video(node, attrs, owner)`, `noscript(node, owner,
    linked)` (True: walk it as a <div>), `is_furniture(node, tag, cls, boiler)` and the `dom_index` attribute
    (set before each media call). Returns False when the DOM is deeper than `max_depth`."""
    cdef object parser = root.parser
    cdef Frame *stack = <Frame *>malloc((max_depth + 1) * sizeof(Frame))
    if stack == NULL:
        raise MemoryError()
    try:
        return _walk(node_of(root), parser, walker, vocab, tags, parents, hints, blocks, pieces, stack, max_depth,
                     main_content)
    finally:
        free(stack)


cdef bint _walk(
    m3w_lxb_node *root, object parser, object walker, Vocabulary vocab, list tags, list parents, list hints,
    list blocks, list pieces, Frame *stack, Py_ssize_t max_depth, bint main_content,
) except -1:
    cdef Py_ssize_t depth = 1, owner = 0, dom = 0, dom_index = 0, idx, media_owner
    cdef int level = 0, in_link = 0, link_chars = 0, hint
    cdef str kind = vocab.paragraph
    cdef m3w_lxb_node *node
    cdef m3w_lxb_node *child
    cdef m3w_lxb_attr *attr
    cdef m3w_lxb_str *data
    cdef Frame *frame
    cdef TagSlot scratch, noscript_scratch
    cdef TagSlot *slot
    cdef const unsigned char *name
    cdef size_t name_length = 0
    cdef bint has_attrs, hidden_attr, is_link, saved, boiler, header_like
    cdef object cls, id_, role, itemprop, aria_hidden, style
    cdef str tag
    cdef object classify = vocab.classify, hidden_by = vocab.hidden_by
    cdef object is_furniture = walker.is_furniture
    stack[0].node = root
    stack[0].idx = 0
    stack[0].is_link = False
    stack[0].saved = True
    stack[0].owner = 0
    stack[0].kind = <PyObject *>vocab.paragraph
    stack[0].level = 0
    stack[0].dom = 0
    node = root.first_child
    while True:
        if node == NULL:
            depth -= 1
            frame = &stack[depth]
            if frame.saved:
                if pieces:
                    flush_text(vocab, blocks, pieces, kind, owner, level, dom, link_chars)
                    link_chars = 0
                owner, kind, level, dom = frame.owner, <str>frame.kind, frame.level, frame.dom
            if frame.is_link:
                in_link -= 1
            if depth == 0:
                return True
            node = frame.node.next
            continue
        if node.type == M3W_LXB_TEXT:
            data = &(<m3w_lxb_character_data *>node).data
            if is_whitespace(data.data, data.length):  # whitespace between tags: a word break, no string
                if pieces:
                    pieces.append(" ")
            else:
                text = decode(data.data, data.length)
                if not pieces:
                    dom = dom_index
                pieces.append(text)
                if in_link:
                    link_chars += len(text.strip())
            node = node.next
            continue
        if node.type != M3W_LXB_ELEMENT:  # comments, the doctype
            node = node.next
            continue
        name = element_name_fn(node, &name_length)
        slot = vocab.lookup(name, name_length, &scratch)
        if slot.action == vocab.skip:
            node = node.next
            continue
        tag = <str>slot.tag
        dom_index += 1
        # The attributes the walk reads, in one pass; a dict only for the elements whose callbacks want one.
        cls = id_ = role = itemprop = aria_hidden = style = None
        attr = (<m3w_lxb_element *>node).first_attr
        has_attrs = attr != NULL
        hidden_attr = False
        while attr != NULL:
            name = attr_name_fn(attr, &name_length)
            if name_is(name, name_length, b"class", 5):
                cls = attr_value(attr)
            elif name_is(name, name_length, b"id", 2):
                id_ = attr_value(attr)
            elif name_is(name, name_length, b"role", 4):
                role = attr_value(attr)
            elif name_is(name, name_length, b"itemprop", 8):
                itemprop = attr_value(attr)
            elif name_is(name, name_length, b"style", 5):
                style = attr_value(attr)
                if style is None:
                    style = ""  # present but empty: not hidden
            elif name_is(name, name_length, b"hidden", 6):
                hidden_attr = True
            elif name_is(name, name_length, b"aria-hidden", 11):
                aria_hidden = attr_value(attr)
                if aria_hidden is None:
                    aria_hidden = ""
            attr = attr.next
        if hidden_attr or (
            (aria_hidden is not None or style is not None) and hidden_by(aria_hidden, style)
        ):
            node = node.next
            continue
        if slot.action != vocab.container:
            if tag == "br":
                pieces.append(vocab.line_break)
                node = node.next
                continue
            if pieces:
                flush_text(vocab, blocks, pieces, kind, owner, level, dom, link_chars)
                link_chars = 0
            walker.dom_index = dom_index
            media_owner = stack[depth - 1].idx
            if tag == "img":
                walker.image(wrap(node, parser), attributes(node), media_owner, in_link > 0)
                node = node.next
                continue
            if tag == "video":
                walker.video(wrap(node, parser), attributes(node), media_owner)
                node = node.next
                continue
            if not walker.noscript(wrap(node, parser), media_owner, in_link > 0):
                node = node.next
                continue
            slot = vocab.lookup(b"div", 3, &noscript_scratch)  # a <noscript> holding the page: walked as a div
            tag = <str>slot.tag
        if has_attrs or slot.meaningful:
            if cls is None:
                cls = ""
            boiler, header_like, hint = classify(tag, cls, id_ or "", role or "", itemprop or "")
            if (boiler or header_like) and hint != 2 and main_content and is_furniture(
                wrap(node, parser), tag, cls, boiler
            ):
                node = node.next
                continue
        else:  # the common case (<p>, <li>, <b>): nothing to classify
            hint = 0
        # Only block elements are recorded: inline ones (a, span, b) never own text or root the content.
        if slot.block == NULL and not hint:
            idx = stack[depth - 1].idx
        else:
            idx = len(tags)
            tags.append(tag)
            parents.append(stack[depth - 1].idx)
            hints.append(hint)
        frame = &stack[depth]
        frame.saved = slot.block != NULL
        if frame.saved:
            if pieces:
                flush_text(vocab, blocks, pieces, kind, owner, level, dom, link_chars)
                link_chars = 0
            frame.owner, frame.kind, frame.level, frame.dom = owner, <PyObject *>kind, level, dom
            # Containers (div, ul, table...) keep an enclosing specific kind (a div inside an li is a list item).
            if <str>slot.block != "paragraph" or tag == "p" or kind == "paragraph":
                kind = <str>slot.block
            owner = idx
            if slot.level:
                level = slot.level
        if depth >= max_depth:
            return False
        child = node.first_child
        if child == NULL:
            if frame.saved:
                owner, kind, level, dom = frame.owner, <str>frame.kind, frame.level, frame.dom
            node = node.next
            continue
        is_link = tag == "a"
        in_link += is_link
        frame.node = node
        frame.idx = idx
        frame.is_link = is_link
        depth += 1
        node = child


# ------------------------------------------------------------------------------------------------ layout check

_bind_lexbor()


def _check_layout() -> None:
    """Walk a known page by the structs above and by selectolax's API; refuse to load on any difference."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser('<body><p class="c" id="i" data-x>one <b>two</b> </p><!-- c --><img src="a.png"></body>')
    body = tree.body
    seen, expected = [], []
    cdef m3w_lxb_node *node = node_of(body).first_child
    cdef size_t length = 0
    cdef const unsigned char *name
    cdef m3w_lxb_node *child
    if node_of(body) != <m3w_lxb_node *><uintptr_t>body.mem_id:
        raise ImportError("m3w.pipeline.html_walk: selectolax's node object is not laid out as compiled")
    py = body.first_child
    while node != NULL:
        if node.type == M3W_LXB_ELEMENT:
            name = element_name_fn(node, &length)
            seen.append((decode(name, length), attributes(node)))
        elif node.type == M3W_LXB_TEXT:
            seen.append(("-text", decode((<m3w_lxb_character_data *>node).data.data,
                                         (<m3w_lxb_character_data *>node).data.length)))
        else:
            seen.append((None, node.type))
        child = node.first_child
        if child != NULL and node.type == M3W_LXB_ELEMENT:
            seen.append(("child", <uintptr_t>child))
        node = node.next
    while py is not None:
        if py.tag == "-text":
            expected.append(("-text", py.text_content))
        elif py.is_element_node:
            expected.append((py.tag, py.attributes))
        else:
            expected.append((None, 8))
        if py.first_child is not None and py.is_element_node:
            expected.append(("child", py.first_child.mem_id))
        py = py.next
    wrapped = wrap(node_of(body), tree)
    seen.append(text_size(body))
    expected.append(len(body.text(deep=True, strip=True, skip_empty=True)))
    if seen != expected or wrapped.mem_id != body.mem_id or wrapped.html != body.html:
        raise ImportError(
            "m3w.pipeline.html_walk was compiled against another selectolax/lexbor layout than the one installed "
            f"(pyproject pins the version): {seen} != {expected}"
        )


_check_layout()

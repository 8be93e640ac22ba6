package main

// Progress bars on a terminal: one line per transfer in flight, redrawn in
// place with ANSI cursor movement, and a permanent line for each transfer
// that ends (and for any message printed meanwhile) scrolled above them.
// Rendering is a pure function of the state and the width, so tests drive
// frames by hand; the ticker only decides when a frame is drawn.

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	// progressInterval is how often a terminal is redrawn, at most.
	progressInterval = 100 * time.Millisecond
	// defaultTermWidth is assumed when $COLUMNS does not say.
	defaultTermWidth = 80
	// minBarWidth: below this the bar is dropped and only the counts shown.
	minBarWidth = 5
)

// isTerminal reports whether w is a character device (a terminal), not a
// file or a pipe. The null device is one too, but nobody watches it: a
// "2>/dev/null" keeps the plain lines on standard output.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return false
	}
	null, err := os.Stat(os.DevNull)
	return err != nil || !os.SameFile(st, null)
}

// termWidth is $COLUMNS when it is a sane number, else 80.
func termWidth(getenv func(string) string) int {
	if n, err := strconv.Atoi(strings.TrimSpace(getenv("COLUMNS"))); err == nil && n >= 20 && n <= 1000 {
		return n
	}
	return defaultTermWidth
}

// progress draws bars on a terminal. It is safe for concurrent use.
type progress struct {
	w     io.Writer
	width int

	mu      sync.Mutex
	live    []*bar   // in flight, in the order they started
	pending []string // permanent lines not drawn yet
	drawn   int      // live lines the last frame left on screen
	dirty   bool

	stop chan struct{}
	done chan struct{}
}

// bar is one transfer.
type bar struct {
	p           *progress
	label       string
	done, total int64
}

func newProgress(w io.Writer, width int) *progress {
	return &progress{w: w, width: width}
}

// start redraws every progressInterval until finish.
func (p *progress) start() {
	p.stop, p.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(p.done)
		t := time.NewTicker(progressInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.draw()
			case <-p.stop:
				return
			}
		}
	}()
}

// finish stops the ticker and draws the last frame: every bar still live
// stays on screen as it is.
func (p *progress) finish() {
	if p.stop != nil {
		close(p.stop)
		<-p.done
		p.stop = nil
	}
	p.draw()
	p.mu.Lock()
	p.drawn = 0
	p.live = nil
	p.mu.Unlock()
}

// line prints a permanent line above the bars.
func (p *progress) line(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pending = append(p.pending, s)
	p.dirty = true
}

// bar adds a bar for a transfer of total bytes (<= 0: unknown).
func (p *progress) bar(label string, total int64) *bar {
	b := &bar{p: p, label: label, total: total}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.live = append(p.live, b)
	p.dirty = true
	return b
}

// add counts n more bytes done.
func (b *bar) add(n int64) {
	b.p.mu.Lock()
	defer b.p.mu.Unlock()
	b.done += n
	b.p.dirty = true
}

// end removes the bar; with a status it leaves a permanent line saying
// so, without one it just disappears (a transfer abandoned because another
// failed).
func (b *bar) end(status string) {
	p := b.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, x := range p.live {
		if x == b {
			p.live = append(p.live[:i:i], p.live[i+1:]...)
			break
		}
	}
	if status != "" {
		p.pending = append(p.pending, fit(b.label+"  "+status+"  "+humanBytes(b.total), p.width))
	}
	p.dirty = true
}

// draw writes a frame if anything changed.
func (p *progress) draw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.dirty {
		return
	}
	io.WriteString(p.w, p.frameLocked())
}

// frameLocked renders the next frame and forgets what it drew: the cursor
// goes up over the live lines of the last frame, permanent lines are
// written over them, the live bars below, and lines left over from a
// taller frame are cleared.
func (p *progress) frameLocked() string {
	var s strings.Builder
	if p.drawn > 0 {
		fmt.Fprintf(&s, "\x1b[%dA", p.drawn)
	}
	lines := len(p.pending) + len(p.live)
	for _, l := range p.pending {
		s.WriteString("\r\x1b[2K" + l + "\n")
	}
	for _, b := range p.live {
		s.WriteString("\r\x1b[2K" + renderBar(b.label, b.done, b.total, p.width) + "\n")
	}
	if extra := p.drawn - lines; extra > 0 {
		s.WriteString(strings.Repeat("\r\x1b[2K\n", extra))
		fmt.Fprintf(&s, "\x1b[%dA", extra)
	}
	p.pending, p.drawn, p.dirty = nil, len(p.live), false
	return s.String()
}

// renderBar is one live line, never wider than width-1 (writing the last
// column makes some terminals wrap, which breaks the redraw):
//
//	sha256:0123456789ab  [=========>          ]    1.5 MiB / 3.0 MiB
func renderBar(label string, done, total int64, width int) string {
	counts := fmt.Sprintf("%10s / %s", humanBytes(done), humanBytes(total))
	if total <= 0 {
		counts = fmt.Sprintf("%10s", humanBytes(done))
	}
	// label, two spaces, [bar], two spaces, counts.
	n := width - 1 - len(label) - 2 - 2 - 2 - len(counts)
	if n < minBarWidth || total <= 0 {
		return fit(label+"  "+counts, width)
	}
	filled := int(min(done, total) * int64(n) / total)
	var b strings.Builder
	b.WriteString(label + "  [")
	switch {
	case filled >= n:
		b.WriteString(strings.Repeat("=", n))
	case filled > 0:
		b.WriteString(strings.Repeat("=", filled-1) + ">" + strings.Repeat(" ", n-filled))
	default:
		b.WriteString(strings.Repeat(" ", n))
	}
	b.WriteString("]  " + counts)
	return b.String()
}

// fit cuts s to width-1 bytes (s is ASCII: digests, sizes, statuses).
func fit(s string, width int) string {
	if width > 1 && len(s) > width-1 {
		return s[:width-1]
	}
	return s
}

package audit

import (
	"context"
	"fmt"
	"sync"
)

// Queue is the asynchronous half of a Log: Send hands an event to one
// writer goroutine, which passes what has piled up to write in batches, so
// a request never waits for the disk or the database. File and the
// PostgreSQL log are both a Queue in front of their own write.
type Queue struct {
	ch    chan item
	batch int
	write func([]Event) error

	// mu guards closed against sends on ch: Send sends under the read
	// lock, Close takes the write lock before closing the channel.
	mu     sync.RWMutex
	closed bool
	done   chan struct{}
}

// item is an event to write, or (flush != nil) a request to report once
// everything queued before it is written.
type item struct {
	e     Event
	flush chan error
}

// NewQueue starts a writer that calls write with up to batch events at a
// time; size events may wait for it.
func NewQueue(size, batch int, write func([]Event) error) *Queue {
	q := &Queue{ch: make(chan item, size), batch: batch, write: write, done: make(chan struct{})}
	go q.run()
	return q
}

// Send queues e. It waits only when the queue is full, and then no longer
// than ctx allows.
func (q *Queue) Send(ctx context.Context, e Event) error { return q.send(ctx, item{e: e}) }

func (q *Queue) send(ctx context.Context, it item) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closed {
		return ErrClosed
	}
	select {
	case q.ch <- it:
		return nil
	default:
	}
	select {
	case q.ch <- it:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("audit: queue full, event dropped: %w", ctx.Err())
	}
}

// Flush waits until every event sent before it is written, and reports the
// first write failure since the previous Flush.
func (q *Queue) Flush(ctx context.Context) error {
	done := make(chan error, 1)
	if err := q.send(ctx, item{flush: done}); err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close writes everything queued and stops the writer; it reports whether
// this call closed the queue (false: it was closed already). Sends after
// Close fail with ErrClosed.
func (q *Queue) Close() bool {
	q.mu.Lock()
	first := !q.closed
	if first {
		q.closed = true
		close(q.ch)
	}
	q.mu.Unlock()
	<-q.done
	return first
}

// run is the writer: it takes what is queued, up to a batch, and writes it
// with one call of write.
func (q *Queue) run() {
	defer close(q.done)
	var (
		batch   []Event
		waiters []chan error
		failed  error // first write failure since the last flush reply
	)
	add := func(it item) {
		if it.flush != nil {
			waiters = append(waiters, it.flush)
		} else {
			batch = append(batch, it.e)
		}
	}
	for open := true; open; {
		it, ok := <-q.ch
		if !ok {
			break
		}
		batch, waiters = batch[:0], waiters[:0]
		add(it)
	drain:
		for len(batch) < q.batch {
			select {
			case it, ok := <-q.ch:
				if !ok {
					open = false
					break drain
				}
				add(it)
			default:
				break drain
			}
		}
		if len(batch) > 0 {
			if err := q.write(batch); err != nil && failed == nil {
				failed = err
			}
		}
		for _, w := range waiters {
			w <- failed
		}
		if len(waiters) > 0 {
			failed = nil
		}
	}
}
